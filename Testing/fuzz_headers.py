"""Fuzzing of image and checkpoint headers (hypothesis): mutated NIfTI, NRRD, MetaImage
and safetensors files must be read or refused with the project's own error
(``InputError`` / ``CheckpointError``), never crash with another exception, and never
take long. Run by hand for a longer search:

    .venv/bin/python Testing/fuzz_headers.py --examples 3000 [--corpus fuzz-corpus/]

The corpus is generated: the seed files (small valid images in every format and a
micro checkpoint) are written into ``--corpus`` (default: a temporary folder) and each
example mutates one of them. ``Testing/test_fuzz_smoke.py`` runs a short search in
the test suite. A failing example is printed by hypothesis with the mutation that made
it, and stays in hypothesis' database (``.hypothesis/``) to be replayed first next time.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.errors import CheckpointError, InputError  # noqa: E402

#: Seconds one read may take before it counts as a hang.
TIME_LIMIT_S = 5.0


def write_corpus(folder: Path) -> dict[str, Path]:
    """Small valid seed files, one per format."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-100, 200, (6, 7, 8)).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    seeds = {}
    for name, compress in (("seed.nii", False), ("seed.nii.gz", True), ("seed.nrrd", False),
                           ("seed_gz.nrrd", True), ("seed.mha", False), ("seed_z.mha", True)):  # fmt: skip
        sitk.WriteImage(image, str(folder / name), useCompression=compress)
        seeds[name] = folder / name
    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint

    seeds["seed.safetensors"] = save_checkpoint(
        init_checkpoint("micro") if _has_micro() else init_checkpoint("tiny"),
        folder / "seed.safetensors",
    )
    return seeds


def _has_micro() -> bool:
    from GDPILiverAnomalyLib.method.unet import MODEL_SIZES

    return "micro" in MODEL_SIZES


_values = st.one_of(
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nan", "-1", "0", "1e308", "raw", "gzip", "LOCAL", "short", "3", "a b c"]),
    st.text(max_size=12),
)


def _mutate_text(data: bytes, draw) -> bytes:
    """Change, drop or duplicate header lines of NRRD/MetaImage (data kept)."""
    if data.startswith(b"NRRD"):
        end = data.find(b"\n\n") + 1
    else:
        end = data.find(b"ElementDataFile")
        end = data.find(b"\n", end) + 1
    header, body = data[:end].decode("latin-1").splitlines(), data[end:]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(header) - 1))
        action = draw(st.sampled_from(["value", "drop", "duplicate"]))
        separator = ": " if data.startswith(b"NRRD") else " = "
        key = header[i].split(":" if ":" in header[i] else "=")[0].strip()
        if action == "value" and i > 0:
            header[i] = f"{key}{separator}{draw(_values)}"
        elif action == "drop" and i > 0:
            header.pop(i)
        else:
            header.insert(i, header[i])
    cut = draw(st.sampled_from([None, 0, len(body) // 2]))
    body = body if cut is None else body[:cut]
    return ("\n".join(header) + "\n").encode("latin-1", "replace") + body


def _mutate_binary(data: bytes, draw, span: int) -> bytes:
    """Overwrite a few bytes of the first ``span`` bytes (NIfTI header fields)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        offset = draw(st.integers(0, min(span, len(out)) - 4))
        fmt = draw(st.sampled_from(["<h", "<i", "<f", "<B"]))
        value = draw(st.integers(-(2**15), 2**15 - 1)) if fmt != "<f" else draw(
            st.floats(allow_nan=True, allow_infinity=True, width=32))  # fmt: skip
        if fmt == "<B":
            value = abs(int(value)) % 256
        out[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(out)


def _mutate_safetensors(data: bytes, draw) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    choice = draw(st.sampled_from(["shape", "dtype", "offsets", "meta", "length", "drop"]))
    if choice in ("shape", "dtype", "offsets", "drop"):
        name = draw(st.sampled_from(names))
        if choice == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-5, 10**9), max_size=5))
        elif choice == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["F64", "I8", "BOOL", "XX", ""]))
        elif choice == "offsets":
            header[name]["data_offsets"] = draw(st.lists(st.integers(-10, 2**40), max_size=3))
        else:
            header.pop(name)
    elif choice == "meta":
        meta = json.loads(header["__metadata__"]["meta"])
        section = draw(st.sampled_from(["model", "diffusion", "intensity", "input_grid"]))
        if isinstance(meta.get(section), dict) and meta[section]:
            key = draw(st.sampled_from(sorted(meta[section])))
            meta[section][key] = draw(_values)
        header["__metadata__"]["meta"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    length = len(raw) if choice != "length" else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + data[8 + n :]


def check_one(path: Path) -> None:
    """Read ``path`` the way ``gdpi detect`` does; only our own errors are allowed."""
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.files.volumes import read_ct

    started = time.monotonic()
    try:
        if path.suffix == ".safetensors":
            load_checkpoint(path)
        else:
            read_ct(path)
    except (InputError, CheckpointError):
        pass
    elapsed = time.monotonic() - started
    assert elapsed < TIME_LIMIT_S, f"reading {path.name} took {elapsed:.1f} s"


def build_property(seeds: dict[str, Path], work: Path, examples: int):
    @settings(
        max_examples=examples,
        deadline=None,  # the time limit is asserted per read instead
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(data=st.data())
    def fuzz(data):
        name = data.draw(st.sampled_from(sorted(seeds)))
        raw = seeds[name].read_bytes()
        if name.endswith(".safetensors"):
            mutated = _mutate_safetensors(raw, data.draw)
        elif name.endswith((".nrrd", ".mha")):
            mutated = _mutate_text(raw, data.draw)
        elif name.endswith(".nii.gz"):
            import gzip

            mutated = gzip.compress(_mutate_binary(gzip.decompress(raw), data.draw, 352))
        else:
            mutated = _mutate_binary(raw, data.draw, 352)
        target = work / ("fuzz-" + name)
        target.write_bytes(mutated)
        check_one(target)

    return fuzz


def run(examples: int, corpus: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = corpus or Path(tmp) / "corpus"
        seeds = write_corpus(folder)
        work = Path(tmp) / "work"
        work.mkdir()
        build_property(seeds, work, examples)()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--corpus", type=Path, help="where the seed files are written")
    args = parser.parse_args()
    t0 = time.monotonic()
    run(args.examples, args.corpus)
    print(f"{args.examples} mutated headers: no crash, no hang ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
