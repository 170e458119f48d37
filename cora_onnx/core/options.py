"""Option values shared by the torch-side and ONNX-side commands, parsed without torch (the
search methods' own options are declared in cora_onnx.torch.search.cli_options)."""

from __future__ import annotations

__all__ = ["parse_keep"]


def parse_keep(text: str) -> tuple[str, ...]:
    """"first,last" -> ("first", "last"); "none" -> ()."""
    text = str(text).strip().lower()
    return () if text in ("", "none") else tuple(s.strip() for s in text.split(",") if s.strip())
