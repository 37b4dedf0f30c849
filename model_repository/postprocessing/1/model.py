"""Triton entry point of the `postprocessing` model.

The implementation is throttllem.backend.triton_model.text_models.PostprocessingModel.

Triton's Python stub runs the base interpreter in isolated mode (PYTHONPATH ignored), so when
throttllem lives in a virtual environment the config parameter `python_site_packages` (filled in
by `throttllem serve`; os.pathsep-separated) names the site-packages folders to put first on
sys.path. It is read from config.pbtxt as this file is imported, before anything imports numpy:
the environment's numpy must win over the base interpreter's. In NGC images throttllem is
installed into the system Python and the parameter stays unset.
"""

import json
import os
import re
import site
import sys

_PARAMETER = re.compile(
    r'key:\s*"python_site_packages"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', re.S
)


def _add_site_packages(value):
    if not value or value.startswith("${"):
        return
    for folder in reversed(value.split(os.pathsep)):
        if not folder or folder in sys.path:
            continue
        before = list(sys.path)
        site.addsitedir(folder)  # also runs the folder's .pth files (editable installs)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before


def _from_config_file():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.pbtxt")
    try:
        with open(path) as f:
            match = _PARAMETER.search(f.read())
    except OSError:
        return ""
    return match.group(1) if match else ""


_add_site_packages(_from_config_file())


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        _add_site_packages(parameters.get("python_site_packages", {}).get("string_value", ""))
        from throttllem.backend.triton_model.text_models import PostprocessingModel

        self._impl = PostprocessingModel()
        self._impl.initialize(args)

    def execute(self, requests):
        return self._impl.execute(requests)

    def finalize(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.finalize()
