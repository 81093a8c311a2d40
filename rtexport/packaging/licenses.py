"""Licence rules that a derived model must follow, as data: the Hub licence id, the attribution to display, the name
prefix, the notice to keep. The model card and the Hub upload read them; nothing else here knows a licence.

A rule applies when its pattern matches the base model's id (``meta-llama/Meta-Llama-3-8B-Instruct``). Models whose id
matches no rule keep the licence recorded in the report (``model.license``), or none.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass

from ..errors import RtexportError


@dataclass(frozen=True)
class LicenseRule:
    family: str  # what the licence calls the materials
    pattern: str  # regular expression searched (case-insensitively) in the base model id
    license: str  # Hub licence identifier (YAML ``license:``)
    license_link: str
    attribution: str  # to be displayed prominently in the card
    name_prefix: str  # a derived model's name must begin with this (Hub names have no spaces: "Llama 3" -> "Llama-3")
    name_pattern: str  # what counts as beginning with it
    notice: str  # the attribution notice kept in a "Notice" text file with every copy

    def matches(self, model_id: str | None) -> bool:
        return bool(model_id) and re.search(self.pattern, model_id, flags=re.IGNORECASE) is not None

    def name_ok(self, name: str) -> bool:
        return re.match(self.name_pattern, name) is not None


def _llama3x(minor: str) -> LicenseRule:
    return LicenseRule(
        family=f"Llama 3.{minor}",
        pattern=rf"llama[-_ ]?3\.{minor}(?!\d)",
        license=f"llama3.{minor}",
        license_link=f"https://www.llama.com/llama3_{minor}/license/",
        attribution="Built with Llama",
        name_prefix="Llama",
        name_pattern=r"^Llama",
        notice=f"Llama 3.{minor} is licensed under the Llama 3.{minor} Community License, "
               "Copyright © Meta Platforms, Inc. All Rights Reserved.",
    )


# Most specific first: "Llama-3.1" must not fall through to the Llama 3 rule.
RULES: tuple[LicenseRule, ...] = (
    _llama3x("3"),
    _llama3x("2"),
    _llama3x("1"),
    LicenseRule(
        family="Meta Llama 3",
        pattern=r"llama[-_ ]?3(?![.\d])",
        license="llama3",
        license_link="https://www.llama.com/llama3/license/",
        attribution="Built with Meta Llama 3",
        name_prefix="Llama-3",
        name_pattern=r"^Llama[-_ ]3(?![.\d])",
        notice="Meta Llama 3 is licensed under the Meta Llama 3 Community License, "
               "Copyright © Meta Platforms, Inc. All Rights Reserved.",
    ),
)


def rule_for(model_id: str | None) -> LicenseRule | None:
    """The licence rule that binds models derived from ``model_id``, if any."""
    for rule in RULES:
        if rule.matches(model_id):
            return rule
    return None


def license_id(model_id: str | None, recorded: str | None) -> str | None:
    """The Hub licence id of a model derived from ``model_id``: the rule's, else the one recorded for the base model."""
    rule = rule_for(model_id)
    return rule.license if rule is not None else (recorded or None)


def conform_name(name: str, rule: LicenseRule | None) -> str:
    """``name`` made to begin with the rule's prefix: cut what comes before the family name (``Meta-Llama-3-8B`` ->
    ``Llama-3-8B``), or put the prefix in front when the name does not contain it."""
    if rule is None or rule.name_ok(name):
        return name
    found = re.search(rule.name_pattern.lstrip("^"), name)
    if found is not None:
        return name[found.start():]
    return f"{rule.name_prefix}-{name}"


def check_name(name: str, model_id: str | None) -> None:
    """Raise when ``name`` (a model or Hub repository name, without the owner) breaks the base model's naming rule."""
    rule = rule_for(model_id)
    if rule is not None and not rule.name_ok(name):
        raise RtexportError(
            f"the {rule.family} licence requires a derived model's name to begin with {rule.name_prefix!r}; "
            f"{name!r} does not (try {conform_name(name, rule)!r})"
        )


def license_for(
    model_id: str | None,
    *,
    local_path: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
) -> str | None:
    """The base model's licence id, from what is at hand without the network, first found wins: a licence rule for
    ``model_id``; the ``license`` of the model card in ``local_path`` or in the Hub cache; the GGUF file's
    ``general.license``. ``None`` when none of them says."""
    rule = rule_for(model_id)
    if rule is not None:
        return rule.license
    cards = []
    if local_path:
        cards.append(Path(local_path) / "README.md")
    if model_id and not local_path:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "README.md", revision=revision)
            if isinstance(cached, str):
                cards.append(Path(cached))
        except Exception:  # not a Hub id, or no cache: nothing to read
            pass
    for card in cards:
        found = _card_license(card)
        if found:
            return found
    if gguf_file:
        path = Path(gguf_file) if local_path is None else Path(local_path) / gguf_file
        return _gguf_license(path)
    return None


def _card_license(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return None
    import yaml

    try:
        meta = yaml.safe_load(text[4:text.index("\n---", 4)])
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _gguf_license(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        value = field.contents() if field is not None else None
    except Exception:  # no gguf package, or an unreadable header: the licence is simply not known
        return None
    return str(value) if value else None
