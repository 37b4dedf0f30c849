"""The `preprocessing` and `postprocessing` Triton models of the text path (ensemble:
text_input, max_tokens, stream -> text_output), with tensorrtllm_backend's tensor names.

preprocessing:  QUERY BYTES [1], REQUEST_OUTPUT_LEN INT32 [1], optional STOP_WORDS_DICT /
                BAD_WORDS_DICT BYTES [-1]
             -> INPUT_ID INT32 [-1], REQUEST_INPUT_LEN INT32 [1], REQUEST_OUTPUT_LEN INT32 [1],
                STOP_WORDS_IDS / BAD_WORDS_IDS INT32 [2, -1]
postprocessing: TOKENS_BATCH INT32 [-1, -1], SEQUENCE_LENGTH INT32 [-1] -> OUTPUT BYTES [-1]
(all with the batch dimension in front). The tokenizer is `tokenizer_dir` (Hugging Face) when
that parameter is set, else the byte-level fallback (tokenizer.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ..params import Parameters
from .tokenizer import Tokenizer, load_tokenizer


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def word_list(tokenizer: Tokenizer, words: list[str]) -> np.ndarray[Any, Any]:
    """Words -> the [2, L] format: flattened ids, then cumulative end offsets padded with -1."""
    ids: list[int] = []
    offsets: list[int] = []
    for word in words:
        if not word:
            continue
        ids.extend(tokenizer.encode(word))
        offsets.append(len(ids))
    width = max(len(ids), len(offsets), 1)
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, :] = 0
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def _load(args: dict[str, str]) -> Tokenizer:
    params = Parameters.from_model_config(json.loads(args["model_config"]))
    return load_tokenizer(params.get_str("tokenizer_dir"))


class PreprocessingModel:
    def initialize(self, args: dict[str, str]) -> None:
        self._tokenizer = _load(args)

    def _one(self, request: Any) -> Any:
        query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
        out_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy()
        batch = len(query)
        encoded = [self._tokenizer.encode(_text(q)) for q in query]
        longest = max((len(e) for e in encoded), default=0)
        ids = np.zeros((batch, max(longest, 1)), dtype=np.int32)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
        lengths = np.array([[len(e)] for e in encoded], dtype=np.int32)
        tensors = [
            pb_utils.Tensor("INPUT_ID", ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", out_len.astype(np.int32).reshape(batch, 1)),
        ]
        words = (("STOP_WORDS_DICT", "STOP_WORDS_IDS"), ("BAD_WORDS_DICT", "BAD_WORDS_IDS"))
        for src, dst in words:
            tensor = pb_utils.get_input_tensor_by_name(request, src)
            rows = tensor.as_numpy().reshape(batch, -1) if tensor is not None else [[]] * batch
            lists = [word_list(self._tokenizer, [_text(w) for w in row]) for row in rows]
            width = max(w.shape[1] for w in lists)
            stacked = np.full((batch, 2, width), -1, dtype=np.int32)
            for i, w in enumerate(lists):
                stacked[i, :, : w.shape[1]] = w
            tensors.append(pb_utils.Tensor(dst, stacked))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:
                err = pb_utils.TritonError(f"preprocessing: {e}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
        return responses

    def finalize(self) -> None:
        pass


class PostprocessingModel:
    def initialize(self, args: dict[str, str]) -> None:
        self._tokenizer = _load(args)

    def _one(self, request: Any) -> Any:
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
        lengths_tensor = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH")
        if tokens.ndim == 2:
            tokens = tokens[:, np.newaxis]
        lengths = (
            lengths_tensor.as_numpy().reshape(tokens.shape[0], -1)
            if lengths_tensor is not None
            else np.full(tokens.shape[:2], tokens.shape[2], dtype=np.int32)
        )
        texts = np.empty(tokens.shape[:2], dtype=object)
        for b in range(tokens.shape[0]):
            for beam in range(tokens.shape[1]):
                n = int(lengths[b, beam])
                ids = [int(t) for t in tokens[b, beam, :n] if t >= 0]
                texts[b, beam] = self._tokenizer.decode(ids).encode("utf-8")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", texts)])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:
                err = pb_utils.TritonError(f"postprocessing: {e}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
        return responses

    def finalize(self) -> None:
        pass
