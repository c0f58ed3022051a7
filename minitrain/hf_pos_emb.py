"""Which position encoding an HF Baichuan 2 checkpoint uses: RoPE (7B) or ALiBi (13B), from evidence only.

The two sizes share every state-dict key, so the weights alone cannot say; a wrong choice loads fine and
gives plausible, wrong logits. Nothing here guesses. Evidence, in order of precedence (the first one is
named in the log line ``position encoding: alibi (from <source>)``, logger ``minitrain.hf``):

1. config.json's ``pos_emb`` field ("rope" | "alibi"; :func:`minitrain.hf.config_to_hf` always writes it;
   ``null`` counts as absent, any other value is a ValueError).
2. The checkpoint directory's own modeling file (``modeling_baichuan.py``, or the module that config.json's
   ``auto_map`` names for ``AutoModelForCausalLM``), parsed with :mod:`ast`, never imported or run. Code
   identifiers only (comments and strings do not count): one containing ``alibi`` (``_gen_alibi_mask``,
   ``alibi_mask``, ``get_alibi_mask``) or ``_get_interleave`` → ALiBi; one containing ``rotary``
   (``RotaryEmbedding``, ``rotary_emb``, ``apply_rotary_pos_emb``) → RoPE. A file with both (a modeling
   file that supports both), with neither, or that does not parse is *no evidence*; the reason is kept for
   the error message.
3. A rotary buffer key in the state dict (a key ending in ``rotary_emb.inv_freq``, written by some
   exporters) → RoPE. Its absence says nothing (the released 7B does not store one).
4. The released shapes: hidden 4096 with 32 layers → RoPE (7B), hidden 5120 with 40 layers → ALiBi (13B).

Every source present is consulted: all must agree, else :class:`PositionEncodingError` names the two
disagreeing sources. No evidence at all (e.g. a small custom config) raises the same error. The
``max_position_embeddings`` field decides nothing (tools add it to 13B configs).

The override — ``pos_emb=`` of :func:`minitrain.hf.load_hf_checkpoint` / :func:`minitrain.hf.config_from_hf`,
``--pos-emb`` on the command line, or an explicit ``config=`` — is not evidence: it wins over everything,
is logged as the source, and a warning is logged for each piece of evidence it contradicts.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["POS_EMBS", "Evidence", "PositionEncodingError", "decide_pos_emb", "gather_evidence",
           "modeling_file_evidence", "ROTARY_KEY_SUFFIX"]

logger = logging.getLogger("minitrain.hf")

POS_EMBS = ("rope", "alibi")
ROTARY_KEY_SUFFIX = "rotary_emb.inv_freq"
MODELING_FILE = "modeling_baichuan.py"
RELEASED_SHAPES = {(4096, 32): ("rope", "7B"), (5120, 40): ("alibi", "13B")}  # (hidden, layers)
OVERRIDE_HELP = ("say which it is: `--pos-emb rope|alibi` on the command line, or "
                 "load_hf_checkpoint(..., pos_emb='rope'|'alibi') / config_from_hf(..., pos_emb=...) in Python")


class PositionEncodingError(ValueError):
    """The position encoding of an HF checkpoint is contradicted or unknown (the message says how to override)."""


@dataclass(frozen=True)
class Evidence:
    pos_emb: str  # "rope" | "alibi"
    source: str  # where it came from, for the log line and error messages


def _check_name(value: Any, what: str) -> str:
    if value not in POS_EMBS:
        raise ValueError(f"{what} must be 'rope' or 'alibi', got {value!r}")
    return value


# ------------------------------------------------------------------------------------- the sources
def _modeling_file_names(d: dict[str, Any]) -> list[str]:
    """modeling_baichuan.py plus the local module auto_map names (``[repo--]module.Class``)."""
    names = [MODELING_FILE]
    auto_map = d.get("auto_map")
    target = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if isinstance(target, str) and "." in target:
        module = target.split("--")[-1].rsplit(".", 1)[0]
        if module.isidentifier() and f"{module}.py" not in names:
            names.append(f"{module}.py")
    return names


def modeling_file_evidence(file: Path) -> tuple[Optional[str], str]:
    """(``"rope"`` | ``"alibi"`` | None, why) from a modeling file's code identifiers (parsed, not run)."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8", errors="replace"), filename=str(file))
    except (SyntaxError, ValueError) as exc:
        return None, f"{file.name} does not parse ({exc.__class__.__name__}), so it is no evidence"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    alibi = sorted(n for n in names if "alibi" in n.lower() or n == "_get_interleave")
    rope = sorted(n for n in names if "rotary" in n.lower())
    if alibi and rope:
        return None, (f"{file.name} builds both an ALiBi mask ({', '.join(alibi[:3])}) and a rotary embedding "
                      f"({', '.join(rope[:3])}), so it is no evidence")
    if alibi:
        return "alibi", f"{file.name} (builds an ALiBi mask: {', '.join(alibi[:3])})"
    if rope:
        return "rope", f"{file.name} (builds a rotary embedding: {', '.join(rope[:3])})"
    return None, f"{file.name} builds neither an ALiBi mask nor a rotary embedding, so it is no evidence"


def gather_evidence(d: dict[str, Any], *, directory: Optional[Path] = None,
                    state_dict_keys: Optional[Iterable[str]] = None) -> tuple[list[Evidence], list[str]]:
    """Every piece of evidence, in precedence order, and notes on the sources that gave none."""
    found: list[Evidence] = []
    notes: list[str] = []
    if d.get("pos_emb") is not None:  # JSON null counts as absent
        found.append(Evidence(_check_name(d["pos_emb"], "config.json's pos_emb"), "config.json's pos_emb field"))
    else:
        notes.append("config.json has no pos_emb field")
    if directory is not None:
        files = [directory / n for n in _modeling_file_names(d) if (directory / n).is_file()]
        if not files:
            notes.append(f"{directory} has no {MODELING_FILE}")
        for file in files:
            pos_emb, why = modeling_file_evidence(file)
            if pos_emb is None:
                notes.append(why)
            else:
                found.append(Evidence(pos_emb, why))
    if state_dict_keys is not None:
        rotary = sorted(k for k in state_dict_keys if k.endswith(ROTARY_KEY_SUFFIX))
        if rotary:
            found.append(Evidence("rope", f"the state dict's rotary buffer {rotary[0]}"))
        else:
            notes.append(f"the state dict has no {ROTARY_KEY_SUFFIX} key")
    shape = (d.get("hidden_size"), d.get("num_hidden_layers"))
    if shape in RELEASED_SHAPES:
        pos_emb, size = RELEASED_SHAPES[shape]
        found.append(Evidence(pos_emb, f"the released Baichuan2-{size} shapes (hidden {shape[0]}, {shape[1]} layers)"))
    else:
        notes.append(f"hidden {shape[0]} / {shape[1]} layers are not a released shape (7B: 4096/32, 13B: 5120/40)")
    return found, notes


# ------------------------------------------------------------------------------------ the decision
def decide_pos_emb(d: dict[str, Any], *, override: Optional[str] = None, override_source: str = "pos_emb= override",
                   directory: Optional[Path] = None, state_dict_keys: Optional[Iterable[str]] = None,
                   where: str = "config.json") -> str:
    """``"rope"`` or ``"alibi"`` for config.json dict ``d`` (see the module docstring), logged with its source.

    ``directory``: the checkpoint directory (for its modeling file); ``state_dict_keys``: the checkpoint's
    keys; ``where``: names the checkpoint in messages. Raises :class:`PositionEncodingError` on conflicting
    or absent evidence unless ``override`` is given."""
    found, notes = gather_evidence(d, directory=directory, state_dict_keys=state_dict_keys)
    if override is not None:
        _check_name(override, "pos_emb")
        for e in found:
            if e.pos_emb != override:
                logger.warning("position encoding: %s overrides %s, which says %s (%s)",
                               override, e.source, e.pos_emb, where)
        logger.info("position encoding: %s (from the %s) for %s", override, override_source, where)
        return override
    if not found:
        raise PositionEncodingError(
            f"cannot tell whether {where} uses RoPE (Baichuan2-7B) or ALiBi (Baichuan2-13B): no evidence "
            f"({'; '.join(notes)}; max_position_embeddings alone does not decide it). Loading it either way "
            f"gives plausible but wrong logits, so {OVERRIDE_HELP}")
    first = found[0]
    for other in found[1:]:
        if other.pos_emb != first.pos_emb:
            raise PositionEncodingError(
                f"conflicting evidence for the position encoding of {where}: {first.source} says "
                f"{first.pos_emb} but {other.source} says {other.pos_emb}. If you know which is right, "
                f"{OVERRIDE_HELP}")
    also = f"; agrees with {', '.join(e.source for e in found[1:])}" if len(found) > 1 else ""
    logger.info("position encoding: %s (from %s%s) for %s", first.pos_emb, first.source, also, where)
    return first.pos_emb
