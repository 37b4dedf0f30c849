"""Triton entry point of the routing model (instance scaling: one name, several sizes).

The implementation is throttllem.backend.triton_model.router.RouterModel. Its config.pbtxt is
the `tensorrt_llm` model's (same inputs and outputs, decoupled) with the engine parameters
replaced by `routing_file`: `throttllem serve --scaling-tp` writes it (docs/scaling.md).
"""

import importlib.util
import json
import os


def _llm_entry():
    """The entry module of a sized `tensorrt_llm` variant beside this model, for its
    site-packages handling; loaded by path under its own name (this module is Triton's
    `model`)."""
    me = os.path.abspath(__file__)
    repository = os.path.dirname(os.path.dirname(os.path.dirname(me)))
    for sibling in sorted(os.listdir(repository)):
        path = os.path.join(repository, sibling, "1", "model.py")
        if path == me or not os.path.isfile(path):
            continue
        with open(path) as f:
            is_entry = "def _add_site_packages" in f.read()
        if is_entry:
            spec = importlib.util.spec_from_file_location("throttllem_llm_entry", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        entry = _llm_entry()
        if entry is not None:
            entry._add_site_packages(
                parameters.get("python_site_packages", {}).get("string_value", "")
            )
        from throttllem.backend.triton_model.router import RouterModel

        self._impl = RouterModel()
        self._impl.initialize(args)

    def execute(self, requests):
        return self._impl.execute(requests)

    def finalize(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.finalize()
