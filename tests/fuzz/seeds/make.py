"""Writes the seed inputs of the fuzz targets (run once; the outputs are committed).

Valid files for the one-block Llama of fuzz_targets/common.rs, so the fuzzer starts from
inputs that pass every check and mutates from there.
"""
import json
import struct
from pathlib import Path

HERE = Path(__file__).parent
SHAPES = {
    "model.embed_tokens.weight": [16, 8],
    "model.layers.0.input_layernorm.weight": [8],
    "model.layers.0.self_attn.q_proj.weight": [8, 8],
    "model.layers.0.self_attn.k_proj.weight": [4, 8],
    "model.layers.0.self_attn.v_proj.weight": [4, 8],
    "model.layers.0.self_attn.o_proj.weight": [8, 8],
    "model.layers.0.post_attention_layernorm.weight": [8],
    "model.layers.0.mlp.gate_proj.weight": [16, 8],
    "model.layers.0.mlp.up_proj.weight": [16, 8],
    "model.layers.0.mlp.down_proj.weight": [8, 16],
    "model.norm.weight": [8],
    "lm_head.weight": [16, 8],
}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def values(name, dtype):
    n = numel(SHAPES[name])
    xs = [((i * 37 + len(name)) % 17 - 8) / 16 for i in range(n)]
    if dtype == "F32":
        return b"".join(struct.pack("<f", x) for x in xs)
    # BF16: the top half of the f32 bits.
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:] for x in xs)


def safetensors(names, dtype, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for n in names:
        b = values(n, dtype)
        header[n] = {"dtype": dtype, "shape": SHAPES[n], "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


names = list(SHAPES)
(HERE / "weights/f32").write_bytes(safetensors(names, "F32", {"format": "pt"}))
(HERE / "weights/bf16").write_bytes(safetensors(names, "BF16"))

first, second = names[:6], names[6:]
s1, s2 = safetensors(first, "BF16"), safetensors(second, "BF16")
files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
index = {
    "metadata": {"total_size": len(s1) + len(s2)},
    "weight_map": {n: files[0] if n in first else files[1] for n in names},
}
ij = json.dumps(index, separators=(",", ":")).encode()
(HERE / "sharded_weights/bf16").write_bytes(
    struct.pack("<H", len(ij)) + ij + struct.pack("<I", len(s1)) + s1 + s2
)

root = HERE.parents[2]
(HERE / "config/stories260K").write_bytes((root.parent / "shared/models/stories260K/config.json").read_bytes())
(HERE / "config/tiny").write_text((HERE.parent / "fuzz_targets/common.rs").read_text().split('r#"')[1].split('"#')[0])
for p in sorted((root / "examples").glob("*.toml")):
    (HERE / "manifest" / p.name).write_bytes(p.read_bytes())
