"""The separation of judges checked by weights: a tuning judge or committee may not be a reporting
judge under another name (metrics/judges.py holds the registry and the check by name)."""

from __future__ import annotations

from cmboost.errors import UserInputError
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judges import REPORTING_JUDGES, TUNING_JUDGE, refuse_reporting_name


def reporting_identities(device="cpu") -> dict[str, str]:
    """{identity: name} of every reporting judge that can be loaded here (one that cannot, because
    an optional package is missing, cannot be passed to tune either)."""

    found = {}
    for name in REPORTING_JUDGES:
        try:
            found[load_feature_extractor(name, device).identity] = name
        except UserInputError:
            continue
    return found


def check_tuning_judge(extractor, flag: str = "--judge", identities: dict[str, str] | None = None) -> None:
    """Raises one line unless `extractor` is free to tune: not a reporting judge by name or weights
    (`identities`: reporting_identities(), when the caller has it already)."""
    refuse_reporting_name(extractor.name, flag)
    if identities is None:
        identities = reporting_identities(extractor.device)
    twin = identities.get(extractor.identity)
    if twin is not None:
        raise UserInputError(f"{flag} {extractor.name}: has the same weights as the reporting judge {twin}; "
                             f"tune with {TUNING_JUDGE} (or your own domain net)")


def check_tuning_committee(extractors, flag: str = "--judge") -> None:
    """Raises one line unless every judge of a tuning committee is free to tune (check_tuning_judge)
    and no two are the same judge, by name or by weights: a judge counted twice is one vote twice."""
    seen: dict[str, str] = {}
    for extractor in extractors:
        if extractor.name in seen.values():
            raise UserInputError(f"{flag} {extractor.name}: named twice; a committee needs different judges")
        if extractor.identity in seen:
            raise UserInputError(f"{flag} {extractor.name}: has the same weights as {seen[extractor.identity]} "
                                 f"({extractor.identity}); a committee needs different judges")
        seen[extractor.identity] = extractor.name
    for extractor in extractors:
        refuse_reporting_name(extractor.name, flag)  # by name first: it needs nothing loaded
    identities = reporting_identities(extractors[0].device) if extractors else {}
    for extractor in extractors:
        check_tuning_judge(extractor, flag, identities)
