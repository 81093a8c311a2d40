"""Text data for tuning and calibration: Hub datasets, local files, or the embedded public-domain corpus.

Everything ends as token blocks: a LongTensor (N, seq_len) of packed text (documents joined with EOS), which is
what router tuning, calibration and perplexity consume.
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import DataError

EMBEDDED = "embedded"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_FIELDS = ("text", "content", "document", "sentence")


@dataclass
class TextSource:
    """What the texts came from, recorded in router configs and plans."""

    name: str
    split: str
    documents: int
    characters: int

    def to_dict(self) -> dict[str, Any]:
        return dict(name=self.name, split=self.split, documents=self.documents, characters=self.characters)


def embedded_corpus(split: str = "train") -> str:
    """The shipped public-domain text (see rtexport/tuning/corpus/SOURCES.md). ``split``: train | heldout."""
    if split not in ("train", "heldout"):
        raise DataError(f"the embedded corpus has splits train and heldout, not {split!r}")
    ref = importlib.resources.files("rtexport.tuning.corpus") / f"{split}.txt.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return f.read()


def format_record(record: dict[str, Any]) -> str:
    """One dataset row as text: Alpaca-style (instruction/input/output) or a plain text field."""
    if "instruction" in record and ("output" in record or "response" in record):
        instruction = str(record.get("instruction") or "").strip()
        extra = str(record.get("input") or record.get("context") or "").strip()
        answer = str(record.get("output") or record.get("response") or "").strip()
        prompt = f"### Instruction:\n{instruction}\n\n"
        if extra:
            prompt += f"### Input:\n{extra}\n\n"
        return prompt + f"### Response:\n{answer}"
    if "messages" in record and isinstance(record["messages"], list):
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in record["messages"])
    for key in TEXT_FIELDS:
        if key in record and isinstance(record[key], str):
            return record[key]
    raise DataError(
        f"cannot find text in a record with fields {sorted(record)}: expected Alpaca-style "
        f"(instruction/input/output), messages, or one of {', '.join(TEXT_FIELDS)}"
    )


def load_texts(
    source: str | None = None,
    *,
    split: str = "train",
    max_documents: int | None = None,
    revision: str | None = None,
) -> tuple[list[str], TextSource]:
    """Texts from ``source``: None/'embedded' (shipped corpus), a local .txt/.jsonl/.json/.parquet file or folder of
    them, or a Hub dataset id (loaded with ``datasets``)."""
    if source in (None, "", EMBEDDED):
        text = embedded_corpus("heldout" if split in ("heldout", "validation", "test") else "train")
        docs = [d for d in text.split("\n\n\n") if d.strip()] or [text]
        src_name = EMBEDDED
    else:
        docs, src_name = _load_dataset_texts(source, split, revision)
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise DataError(f"no text found in {source!r} (split {split!r})")
    return docs, TextSource(src_name, split, len(docs), sum(len(d) for d in docs))


def _load_dataset_texts(source: str, split: str, revision: str | None) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading datasets needs the datasets package: pip install datasets") from None
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise DataError(f"no .txt/.jsonl/.json/.parquet files in {source}")
        kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"{source}: use one kind of file (.txt, .jsonl/.json or .parquet)")
        kind = kinds.pop()
        if kind == "text":
            docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
            return [d for d in docs if d.strip()], str(path)
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
        return [format_record(r) for r in ds], str(path)
    try:
        ds = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as e:  # network, missing split, unknown id: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load dataset {source!r} (split {split!r}): {msg}") from e
    return [format_record(r) for r in ds], source


def pack_blocks(
    tokenizer: Any, texts: Iterable[str], seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into full blocks of ``seq_len`` tokens."""
    if seq_len < 2:
        raise DataError("--seq-len must be at least 2")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for text in texts:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"not enough text for one block of {seq_len} tokens ({len(ids)} tokens found)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_blocks(
    tokenizer: Any,
    source: str | None = None,
    *,
    split: str = "train",
    seq_len: int = 512,
    max_blocks: int | None = None,
    revision: str | None = None,
) -> tuple[torch.Tensor, TextSource]:
    texts, info = load_texts(source, split=split, revision=revision)
    return pack_blocks(tokenizer, texts, seq_len, max_blocks), info


def split_blocks(blocks: torch.Tensor, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of blocks into (train, heldout) for sources that have no held-out split of their own."""
    n = blocks.shape[0]
    k = max(1, int(round(n * heldout_fraction))) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[perm[k:]], blocks[perm[:k]]


def with_repeats(blocks: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Copy-augmented training blocks: in a seeded ``fraction`` of them the second half repeats the first half.

    The repeated half can only be predicted by looking back into the context (what induction heads do, and what
    tasks such as LAMBADA need); ordinary prose rarely asks for it, so routers tuned on prose alone learn to drop the
    layers that do it. Returns a new tensor; ``fraction`` 0 returns ``blocks`` unchanged.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"--repeat-fraction must be in [0, 1], got {fraction}")
    n, t = blocks.shape
    k = int(round(n * fraction))
    if k == 0 or t < 4:
        return blocks
    out = blocks.clone()
    half = t // 2
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))[:k]
    out[chosen, t - half :] = out[chosen, :half]
    return out
