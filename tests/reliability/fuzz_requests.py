"""Hypothesis strategies for hostile requests: HTTP generate / generate_stream bodies and gRPC
stream requests with random field names, types, shapes, sizes, encodings and truncations.

Large payloads are drawn as (size, pattern) and expanded afterwards, so hypothesis never has
to generate (or shrink) megabytes itself.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass

from hypothesis import strategies as st

from dsv4.backend.serving.request import INPUT_NAMES

MB = 1_000_000
# the size of the one large field a request may carry, by weight: most requests are small
SIZES = ((70, 0), (12, 1_000), (8, 100_000), (5, 5 * MB), (3, 18 * MB), (2, 100 * MB))
PATHS = ("/v2/models/dsv4/generate", "/v2/models/dsv4/generate_stream", "/v2/models/dsv4_unary/generate",
         "/v2/models/dsv4/infer", "/v2/models/nope/generate")
MANY_KEYS = 10_000
CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "", "text/plain", "application/json; charset=utf-16",
                 "multipart/form-data; boundary=x")
TRITON_TYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
                "BF16", "BYTES")


@dataclass(frozen=True)
class HttpRequest:
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunk_size: int | None  # Transfer-Encoding: chunked with pieces of this size
    truncate_to: int | None  # send only this many body bytes, then close the write side


@dataclass(frozen=True)
class GrpcRequest:
    message: object  # a ModelInferRequest
    abandon: bool  # cancel the stream right after sending, as a client that goes away


def size_class(cap: int) -> st.SearchStrategy[int]:
    """A payload size drawn by SIZES' weights, never above `cap` (shrinks towards 0)."""
    total = sum(w for w, _ in SIZES)

    def pick(n: int) -> int:
        for weight, size in SIZES:
            if n < weight:
                return min(size, cap)
            n -= weight
        return 0

    return st.integers(0, total - 1).map(pick)


def expand(pattern: str, size: int) -> str:
    return (pattern * (size // max(1, len(pattern)) + 1))[:size] if size else pattern


json_leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=20))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)
prompts = st.sampled_from(["Hello", "hi", "a normal prompt", "", " ", "\x00", "\ud7ff\ue000", "日本語のテキスト"]) | st.text(max_size=40)
FIELD_VALUES = {
    "text_input": prompts,
    "max_tokens": st.integers(-3, 6) | st.sampled_from([0, 1025, 2**31 - 1, -(2**31), 2**32, 2**63]),
    "min_tokens": st.integers(-2, 8),
    "temperature": st.floats(-1, 3) | st.sampled_from([0.0, 1e308, -0.0]),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 200000),
    "seed": st.integers(-5, 2**64 + 5),
    "stop_words": st.lists(st.text(max_size=6), max_size=4),
    "stream": st.booleans(),
    "exclude_input_in_output": st.booleans(),
    "apply_chat_template": st.booleans(),
}


VALID_VALUES = {
    "max_tokens": st.integers(1, 8), "min_tokens": st.integers(0, 2), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(0, 50), "seed": st.integers(0, 2**64 - 1), "stop_words": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "exclude_input_in_output": st.booleans(),
}


@st.composite
def http_bodies(draw, cap: int, wild: bool) -> bytes:
    """A JSON body: a valid request with a few fields changed, or (wild) any fields at all; one
    of them possibly large or deeply nested."""
    fields: dict[str, object] = {"text_input": draw(prompts)}
    for name in draw(st.lists(st.sampled_from(list(VALID_VALUES)), max_size=4, unique=True)):
        fields[name] = draw(VALID_VALUES[name])
    for name in draw(st.lists(st.sampled_from(INPUT_NAMES) | st.text(max_size=12), max_size=5 if wild else 1)):
        fields[name] = draw(FIELD_VALUES.get(name, json_values) | json_values)
    if wild and draw(st.booleans()):
        fields.pop("text_input", None)
    if draw(st.integers(0, 9)) == 9:
        fields["parameters"] = draw(st.dictionaries(st.sampled_from(["sequence_id", "triton_x", "priority", "x"]) | st.text(max_size=6),
                                                    json_leaves, max_size=3))
    size = draw(size_class(cap))
    where = draw(st.sampled_from(["text_input", "stop_words", "key", "unknown", "nested", "many_keys", "number"]))
    pattern = draw(st.sampled_from(["token ", "x", "é", "\U0001f600", "\ud800", "\\", '"', "\x00"]))
    if size:
        if where == "text_input":
            fields["text_input"] = expand(pattern, size)
        elif where == "stop_words":
            fields["stop_words"] = [expand(pattern, 64)] * max(1, size // 64)
        elif where == "key":
            fields[expand(pattern, size)] = 1
        elif where == "unknown":
            fields["blob"] = expand(pattern, size)
        elif where == "many_keys":
            # Triton 2.51 turns each unknown key into a request parameter in time quadratic in their
            # number (100,000 keys: half a minute of CPU before the answer); kept where that is quick
            fields.update({f"k{i}": i for i in range(max(1, min(size // 12, MANY_KEYS)))})
    text = json.dumps(fields, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if size and where == "nested":  # deep arrays: a recursive JSON parser would use the stack up
        depth = max(1, size // 2)
        text = text[:-1] + (", " if fields else "") + '"deep": ' + "[" * depth + "]" * depth + "}"
    elif size and where == "number":
        text = text[:-1] + (", " if fields else "") + '"max_tokens": ' + "9" * size + "}"
    return draw(_serialized(text)) if wild else text.encode("utf-8", "surrogatepass")


@st.composite
def _serialized(draw, text: str) -> bytes:
    """The body as bytes: plain, or cut short, padded, re-encoded, or replaced by noise."""
    data = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["plain", "cut", "garbage_after", "bom", "utf16", "noise", "bad_utf8", "empty"]))
    if how == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "garbage_after":
        return data + draw(st.binary(min_size=1, max_size=16))
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "utf16":
        return text.encode("utf-16", "surrogatepass")
    if how == "noise":
        return draw(st.binary(max_size=64))
    if how == "bad_utf8":
        return data.replace(b'"', b'"\xc3\x28', 1)
    if how == "empty":
        return b""
    return data


@st.composite
def http_requests(draw, cap: int) -> HttpRequest:
    """Half the requests are well-formed but for their body's fields; the rest change anything."""
    wild = draw(st.booleans())
    body = draw(http_bodies(cap, wild))
    path = draw(st.sampled_from(PATHS if wild else PATHS[:2]))
    if not wild:
        return HttpRequest(path, (("Content-Type", draw(st.sampled_from(CONTENT_TYPES[:3]))),), body, None, None)
    headers = [("Content-Type", draw(st.sampled_from(CONTENT_TYPES)))]
    encoding = draw(st.sampled_from(["none", "gzip", "deflate", "gzip-lie", "br"]))
    if encoding == "gzip":
        body = gzip.compress(body, compresslevel=1)
    elif encoding == "deflate":
        body = zlib.compress(body, 1)
    if encoding != "none":
        headers.append(("Content-Encoding", encoding.replace("-lie", "")))
    chunk = draw(st.sampled_from([None, 1, 7, 4096, 65536]))
    if chunk is not None:
        chunk = max(chunk, len(body) // 100_000)  # each chunk costs the server ~1 KB: stay within memory
    truncate = draw(st.integers(0, max(0, len(body) - 1))) if body and draw(st.integers(0, 4)) == 4 else None
    return HttpRequest(path, tuple(headers), body, chunk, truncate)


GRPC_TYPES = {"text_input": "BYTES", "stop_words": "BYTES", "max_tokens": "INT32", "min_tokens": "INT32", "top_k": "INT32",
              "temperature": "FP32", "top_p": "FP32", "seed": "UINT64", "stream": "BOOL", "exclude_input_in_output": "BOOL",
              "apply_chat_template": "BOOL"}


@st.composite
def grpc_requests(draw, cap: int) -> GrpcRequest:
    """A stream request: well-formed tensors with one changed, or (wild) any names, types and shapes."""
    from tritonclient.grpc import service_pb2 as pb

    wild = draw(st.booleans())
    model = draw(st.sampled_from(["dsv4", "dsv4_unary", "nope", ""] if wild else ["dsv4"]))
    msg = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=8)))
    # the final flag tells the fuzzer when a stream's answer is complete
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    if wild:
        for key, value in draw(st.dictionaries(st.text(max_size=10), st.integers(-5, 5) | st.text(max_size=8) | st.booleans(),
                                               max_size=3)).items():
            param = msg.parameters[key]
            if isinstance(value, bool):
                param.bool_param = value
            elif isinstance(value, int):
                param.int64_param = value
            else:
                param.string_param = value
    names = ["text_input"] + draw(st.lists(st.sampled_from(list(VALID_VALUES)), max_size=3, unique=True))
    names += draw(st.lists(st.sampled_from(INPUT_NAMES) | st.text(max_size=10), max_size=4 if wild else 1))
    use_raw = draw(st.booleans())
    names = list(dict.fromkeys(names))
    retyped = draw(st.integers(0, 4 * len(names) - 1))  # well-formed requests: one tensor in four gets a wrong type
    for i, name in enumerate(names):
        right = GRPC_TYPES.get(name, "BYTES")
        dtype = draw(st.sampled_from(TRITON_TYPES) | st.text(max_size=5)) if wild or i == retyped else right
        shape = draw(st.sampled_from([[1], [], [0], [2], [1, 1], [-1], [2**40]]) | st.lists(st.integers(-2, 3), max_size=3)) if wild else [1]
        tensor = msg.inputs.add(name=name, datatype=dtype, shape=shape)
        if i == 0:
            values = [expand(draw(prompts), draw(size_class(cap))).encode("utf-8", "surrogatepass")]
        elif name in VALID_VALUES and dtype == right:
            values = [draw(VALID_VALUES[name])]
            values = [s.encode() for s in values[0]] if name == "stop_words" else values
        else:
            values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3))
        if not wild and name == "stop_words":
            shape = [len(values)]
        _fill(tensor, msg, dtype, values, use_raw and wild, draw(st.binary(max_size=9)) if wild else b"")
    if wild:
        for name in draw(st.lists(st.sampled_from(["text_output", "output_ids", "finish_reason", "bogus"]), max_size=2)):
            msg.outputs.add(name=name)
    return GrpcRequest(msg, abandon=draw(st.integers(0, 9)) == 9)


def _fill(tensor, msg, dtype: str, values: list, raw: bool, noise: bytes) -> None:
    """Put `values` into the tensor as the datatype says, or (raw) as bytes that may not fit it."""
    if raw:
        data = b"".join(len(v).to_bytes(4, "little") + v if isinstance(v, bytes) else int(v).to_bytes(8, "little", signed=True)
                        for v in values)
        msg.raw_input_contents.append(data + noise)
        return
    if dtype == "BYTES":
        tensor.contents.bytes_contents.extend(v if isinstance(v, bytes) else str(v).encode() for v in values)
        return
    # a string meant for another type arrives as its length
    numbers = [len(v) if isinstance(v, bytes) else v for v in values]
    if dtype == "BOOL":
        tensor.contents.bool_contents.extend(bool(v) for v in numbers)
    elif dtype in ("FP32", "FP16", "BF16"):
        tensor.contents.fp32_contents.extend(float(v) for v in numbers)
    elif dtype == "FP64":
        tensor.contents.fp64_contents.extend(float(v) for v in numbers)
    elif dtype == "UINT64":
        tensor.contents.uint64_contents.extend(int(v) % 2**64 for v in numbers)
    elif dtype.startswith("UINT"):
        tensor.contents.uint_contents.extend(int(v) % 2**32 for v in numbers)
    elif dtype == "INT64":
        tensor.contents.int64_contents.extend(int(v) % 2**63 for v in numbers)
    else:
        tensor.contents.int_contents.extend((int(v) + 2**31) % 2**32 - 2**31 for v in numbers)
