"""Test fixtures for the tagger and the captioner: a tiny ONNX model with the WD taggers' input/output
contract, its `selected_tags.csv`, and a loopback imitation of the Hugging Face hub that serves them.

The model is written without the `onnx` package (it needs a protobuf newer than the WebUI's 3.20.0):
a few lines of protobuf wire format are all an ONNX file is. The graph averages each colour channel
of the NHWC input, so colour decides the tags: a red image gets the red tags only if the tagger really
feeds the model BGR pixels, and the tags a test sees can only have come out of onnxruntime.
"""

from __future__ import annotations

import http.server
import math
import struct
import threading
from contextlib import contextmanager
from pathlib import Path

SIZE = 448
INPUT_NAME = "input_1:0"
OUTPUT_NAME = "predictions_sigmoid"


# -- protobuf wire format ----------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


# -- ONNX messages (field numbers from onnx.proto) ---------------------------------------------------

FLOAT = 1  # TensorProto.DataType


def tensor(name: str, dims: list[int], values: list[float]) -> bytes:
    return b"".join(_int(1, d) for d in dims) + _int(2, FLOAT) + _bytes(8, name) + _bytes(9, struct.pack(f"<{len(values)}f", *values))


def value_info(name: str, dims: list[int | str]) -> bytes:
    dim_msgs = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, FLOAT) + _bytes(2, dim_msgs)  # elem_type, shape
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))  # name, type.tensor_type


def attr_ints(name: str, values: list[int]) -> bytes:
    return _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)  # type INTS


def attr_int(name: str, value: int) -> bytes:
    return _bytes(1, name) + _int(3, value) + _int(20, 2)  # type INT


def node(op: str, inputs: list[str], outputs: list[str], attributes: list[bytes] = ()) -> bytes:
    return (
        b"".join(_bytes(1, i) for i in inputs)
        + b"".join(_bytes(2, o) for o in outputs)
        + _bytes(3, f"{op}_{outputs[0]}")
        + _bytes(4, op)
        + b"".join(_bytes(5, a) for a in attributes)
    )


def model(nodes: list[bytes], initializers: list[bytes], inputs: list[bytes], outputs: list[bytes], opset: int = 17) -> bytes:
    graph = (
        b"".join(_bytes(1, n) for n in nodes)
        + _bytes(2, "tiny_tagger")
        + b"".join(_bytes(5, t) for t in initializers)
        + b"".join(_bytes(11, i) for i in inputs)
        + b"".join(_bytes(12, o) for o in outputs)
    )
    opset_import = _bytes(1, "") + _int(2, opset)
    return _int(1, 8) + _bytes(2, "lora-maker-tests") + _bytes(7, graph) + _bytes(8, opset_import)


# -- the tiny tagger ---------------------------------------------------------------------------------

def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# (name, category, colour it answers to, probability for an image of exactly that colour).
# Other colours push the logit far down, so every other tag is ~0 for a pure colour.
# Colours are named as the user sees them (RGB); the model sees BGR.
TAGS = [
    ("general", 9, "blue", 0.9),
    ("sensitive", 9, "red", 0.8),
    ("questionable", 9, "green", 0.7),
    ("explicit", 9, None, 0.0),
    ("red_theme", 0, "red", 0.99),
    ("solo", 0, "red", 0.6),  # between the default general threshold and 0.7
    ("looking_at_viewer", 0, "red", 0.4),  # just above the default 0.35
    ("highres", 0, "red", 0.95),  # a meta tag: blacklisted by default
    ("blue_theme", 0, "blue", 0.97),
    ("^_^", 0, "blue", 0.9),  # an emoticon: its underscore stays
    ("green_theme", 0, "green", 0.98),
    ("hatsune_miku_(append)", 4, "red", 0.9),  # a character above 0.85
    ("kagamine_rin", 4, "red", 0.6),  # a character below 0.85 though above the general threshold
    ("sky_(blue)", 0, "blue", 0.3),  # below the default threshold
]
_CHANNEL = {"blue": 0, "green": 1, "red": 2}  # index in the model's BGR input


def weights() -> tuple[list[float], list[float]]:
    """W [3, T] (row-major) and bias [T] over channel means scaled to 0..1: for a pure colour the
    logit is `bias + W[colour]`, and any other channel at full strength costs 30."""
    w = [[0.0] * len(TAGS) for _ in range(3)]
    bias = []
    for t, (_, _, colour, p) in enumerate(TAGS):
        if colour is None:
            bias.append(-30.0)
            continue
        c = _CHANNEL[colour]
        bias.append(-15.0)
        for ch in range(3):
            w[ch][t] = 15.0 + _logit(p) if ch == c else -30.0
    return [v / 255.0 for row in w for v in row], bias


def tagger_model(batch: int | str = "N", size: int = SIZE) -> bytes:
    """NHWC float32 [batch, size, size, 3] -> ReduceMean(H, W) -> MatMul + Add -> Sigmoid -> [batch, T]."""
    w, bias = weights()
    n = len(TAGS)
    return model(
        nodes=[
            node("ReduceMean", [INPUT_NAME], ["means"], [attr_ints("axes", [1, 2]), attr_int("keepdims", 0)]),
            node("MatMul", ["means", "w"], ["logits_nobias"]),
            node("Add", ["logits_nobias", "bias"], ["logits"]),
            node("Sigmoid", ["logits"], [OUTPUT_NAME]),
        ],
        initializers=[tensor("w", [3, n], w), tensor("bias", [n], bias)],
        inputs=[value_info(INPUT_NAME, [batch, size, size, 3])],
        outputs=[value_info(OUTPUT_NAME, [batch, n])],
    )


def selected_tags_csv() -> str:
    lines = ["tag_id,name,category,count"]
    lines += [f"{1000 + i},{name},{category},{5000 - i}" for i, (name, category, _, _) in enumerate(TAGS)]
    return "\n".join(lines) + "\n"


def write_tagger(folder: Path, batch: int | str = "N") -> Path:
    """A local tagger folder in the hub's layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(tagger_model(batch))
    (folder / "selected_tags.csv").write_text(selected_tags_csv(), encoding="utf-8")
    return folder


# -- a loopback hub ----------------------------------------------------------------------------------

class Hub:
    """Serves `repos[repo_id][filename] = bytes` at `/{repo_id}/resolve/main/{filename}` with Range
    support, like the hub. `drop_after[filename] = n` sends only n bytes of the next full response
    before cutting the connection; `requests` logs every (path, Range header); `status[repo_id]`
    answers that status for the whole repo (401 for a gated one)."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.drop_after: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []  # path, Range, Authorization
        self.url = ""

    def handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _fail(self, status: int):
                body = b"not found"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                parts = self.path.lstrip("/").split("/resolve/main/", 1)
                if len(parts) != 2:
                    return self._fail(404)
                repo, filename = parts
                if repo in hub.status:
                    return self._fail(hub.status[repo])
                data = hub.repos.get(repo, {}).get(filename)
                if data is None:
                    return self._fail(404)
                start = 0
                wanted = self.headers.get("Range")
                if wanted:
                    start = int(wanted.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = hub.drop_after.pop(filename, None) if not wanted else None
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients closing kept-alive connections, and the connections a test cuts on purpose


@contextmanager
def serve_hub():
    hub = Hub()
    server = _QuietServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def hub_files(folder: Path) -> dict[str, bytes]:
    """Every file of a local folder, as a hub repo's contents."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
