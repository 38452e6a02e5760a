"""Secret masking (R-MASK): one masker for everything that is logged or persisted.

Masking happens at the sink (the logging filter, the event/result writers), not at call
sites, so a careless ``logger.info(f"... {password}")`` still cannot leak. Three layers:

* **Keys.** A mapping key that names a secret (:func:`is_secret_key`) has its whole value
  replaced, whatever its type, unless the value is a secret *reference*
  (``{"$secret": "name"}``): plans carry references and the name is not sensitive.
* **Shapes.** Inside any string: ``key=value`` / ``key: value`` / ``"key": "value"`` pairs
  with a secret-shaped key, ``Bearer …``, PEM private keys, URL ``user:password@``,
  JWTs, cloud-key-shaped tokens (AWS, GitHub, GitLab, Slack, ``sk-…``, Stripe, Google).
  A string that is itself a JSON object or array is masked structurally.
* **Values.** Every resolved secret is registered (:func:`register_secret`) while it is in
  use, and replaced wherever it appears, also in its JSON-escaped and percent-encoded forms.

Masking runs on every log line, so the cost of a string with nothing in it matters most:
one cache lookup, or one search of a precompiled trigger pattern over the case-folded text.
The trigger is a deliberately loose superset of everything the slow path can mask; only
strings it fires on pay for the real patterns.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote, quote_plus

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "SECRET_KEY_PATTERN",
    "SECRET_REF_KEY",
    "Masker",
    "is_secret_key",
    "is_secret_reference",
    "mask_text",
    "mask_value",
    "masker",
    "register_secret",
    "registered_secrets",
    "unregister_secret",
]

REDACTED: Final = "***REDACTED***"

SECRET_REF_KEY: Final = "$secret"  # noqa: S105 - a key name, not a password
"""The one key of a secret reference, ``{"$secret": "name"}`` (SPEC R-SEC)."""

MIN_SECRET_LENGTH: Final = 4
"""Shorter values are refused by :meth:`Masker.register`.

Value-based masking replaces every occurrence of the value in every string. A one- to
three-character value (``"1"``, ``"ok"``, ``"abc"``) occurs inside ordinary words, ids and
numbers everywhere, so registering it would shred every log line and event while adding
almost no protection: a secret that short is guessable anyway. Such a value is still
masked by the key and shape rules when it appears as ``password=…`` and the like.
"""

# Why ``auth(?!or(?!i[sz]ation))``: ``auth`` must catch ``auth``, ``Authorization``,
# ``x-auth-token``, ``authToken``, ``oauth`` and ``authentication``, but a plain substring
# match would also mask ``author``, ``authors``, ``authored_by`` and ``authority``, which are
# common, never secret, and worth seeing in logs (a plan's author, a URL authority). So
# ``auth`` followed by ``or`` counts only when the word goes on as ``orization`` (or the
# British ``orisation``). ``authorize``/``authorized`` are therefore not secret keys either.
_KEY_WORDS = (
    r"password|passwd|token|api[_-]?key|secret|credential|private[_-]?key|access[_-]?key"
    r"|auth(?!or(?!i[sz]ation))|bearer|session"
)

SECRET_KEY_PATTERN = re.compile(_KEY_WORDS, re.IGNORECASE)


@lru_cache(maxsize=4096)
def is_secret_key(name: str) -> bool:
    """True when a mapping key names a secret (``db_password``, ``X-Api-Key``, ``token``…).

    A substring search, so compound keys (``deploy_token``, ``x-auth-token``) count; see
    ``_KEY_WORDS`` for why ``author``/``authority`` do not. Cached: the same few dozen keys
    are asked about on every log record and event.
    """
    return SECRET_KEY_PATTERN.search(name) is not None


def is_secret_reference(value: object) -> bool:
    """True for ``{"$secret": "name"}``, which names a secret without containing it."""
    return type(value) is dict and len(value) == 1 and type(value.get(SECRET_REF_KEY)) is str


# --- the trigger: a cheap superset test on case-folded text ---------------------------------
#
# The cost of a search is dominated by the match attempts started at candidate first
# characters, so each alternative is anchored on the *rarest* letter of its needle (``w``
# of passw, ``k`` of token/key, ``u`` of auth, ``j`` of eyJ…) with a look-behind to confirm
# the rest. On ordinary log strings this measured ~1.5x faster than a trie anchored on first
# letters, and ~8x faster than the plain word list with re.IGNORECASE (hence casefold()
# first). It must stay a superset of what _SHAPES_RE and the key rules can mask: a string
# it does not fire on is returned as it is.
_STATIC_TRIGGER = (
    r"w(?<=passw)"  # password, passwd
    r"|k(?:ey|(?<=tok)en|_live_|(?<=ak)ia)"  # *key, token, Stripe [rs]k_live_, AKIA
    r"|u(?<=au)th"  # auth, authorization, oauth
    r"|bearer"
    r"|s(?:ecret|ession|k-|(?<=as)ia)"  # secret, session, sk-…, ASIA
    r"|d(?<=cred)ential"
    r"|j(?<=eyj)"  # JWT header "eyJ"
    r"|z(?<=aiz)a"  # Google "AIza"
    r"|g(?:h[pousr]_|ithub_pat_|lpat-)"
    r"|xox[baprs]-"
    r"|://[^\s/@]*@"  # URL with userinfo
)
_STATIC_TRIGGER_RE: Final = re.compile(_STATIC_TRIGGER)

# --- the shapes: only run on strings the trigger fired on -----------------------------------

# A value after ``key=``/``key:`` ends at whitespace, a quote, or a separator of query
# strings, cookies and comma lists. It may not *start* with ``{`` or ``[``: a structured
# value under a secret key in free text is most likely a secret reference.
_UNQUOTED_VALUE = r"""(?:(?:bearer|basic|token|digest|negotiate)[ \t]+)?[^\s"'&,;{\[][^\s"'&,;]*"""
_SHAPES_RE: Final = re.compile(
    rf"""
    (?P<pem>-----BEGIN[ A-Z0-9]*PRIVATE[ ]KEY[ A-Z]*-----(?s:.*?)
        (?:-----END[ A-Z0-9]*PRIVATE[ ]KEY[ A-Z]*-----|\Z))
    |(?P<url>[a-z][a-z0-9+.-]*://[^\s:/@"'<>]*:)(?P<url_pw>[^\s/"'<>]+)(?=@)
    |(?P<kv>(?<!\$)(?:{_KEY_WORDS})[\w.-]*(?:\\?["'])?[ \t]*(?:=>?|:)[ \t]*)
        (?P<kv_v>\\"(?:[^"\\]|\\[^"])*(?:\\"|\Z)
                |"(?:[^"\\]|\\.)*(?:"|\Z)
                |'(?:[^'\\]|\\.)*(?:'|\Z)
                |{_UNQUOTED_VALUE})
    |(?P<bearer>\bbearer[ \t]+)(?P<bearer_v>[a-z0-9._~+/=-]+)
    |(?P<jwt>eyJ[a-z0-9_-]{{8,}}\.[a-z0-9_-]{{4,}}\.[a-z0-9_-]*)
    |(?P<cloud>(?-i:
        \b(?:AKIA|ASIA)[0-9A-Z]{{16}}\b
        |\bgh[pousr]_[A-Za-z0-9]{{20,}}
        |\bgithub_pat_[A-Za-z0-9_]{{20,}}
        |\bglpat-[A-Za-z0-9_-]{{20,}}
        |\bxox[baprs]-[A-Za-z0-9-]{{10,}}
        |\bsk-[A-Za-z0-9_-]{{16,}}
        |\b[rs]k_live_[A-Za-z0-9]{{16,}}
        |\bAIza[0-9A-Za-z_-]{{35}}
    ))
    """,
    re.IGNORECASE | re.VERBOSE,
)


def _replace_shape(match: re.Match[str]) -> str:
    kind = match.lastgroup  # the group that closed last: the value group of a pair
    if kind == "kv_v":
        value = match.group("kv_v")
        # Keep the quotes so masked JSON-ish or repr text keeps its shape.
        if value.startswith('\\"'):
            return match.group("kv") + '\\"' + REDACTED + '\\"'
        if value[0] in "\"'":
            return match.group("kv") + value[0] + REDACTED + value[0]
        return match.group("kv") + REDACTED
    if kind == "url_pw":
        return match.group("url") + REDACTED
    if kind == "bearer_v":
        return match.group("bearer") + REDACTED
    return REDACTED  # pem, jwt, cloud: the whole match is the secret


# --- the registry ---------------------------------------------------------------------------

_CACHE_MAX_ENTRIES: Final = 4096
_CACHE_MAX_TEXT: Final = 512


@dataclass(frozen=True, slots=True)
class _Matcher:
    """An immutable snapshot of the registry, compiled; swapped whole on every change.

    Readers take ``masker._matcher`` once and use it without a lock, so a registration
    never blocks a log line. ``cache`` maps already-seen strings to their masked form;
    it belongs to the snapshot so a registry change starts from an empty cache and can
    never serve a result computed without the new secret. ``keys`` caches, per mapping
    key, ``_SECRET_NAME`` (secret-shaped: replace the value) or the key itself masked.
    """

    trigger: re.Pattern[str]
    secrets: re.Pattern[str] | None
    cache: dict[str, str] = field(default_factory=dict)
    keys: dict[str, object] = field(default_factory=dict)


def _variants(value: str) -> set[str]:
    """The forms a secret takes when it travels: raw, JSON-escaped, percent-encoded."""
    forms = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote_plus(value, safe=""),
    }
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def _compile(values: Iterable[str]) -> _Matcher:
    forms: set[str] = set()
    for value in values:
        forms |= _variants(value)
    if not forms:
        return _Matcher(trigger=_STATIC_TRIGGER_RE, secrets=None)
    # Longest first so that a secret which contains another is replaced whole.
    ordered = sorted(forms, key=lambda form: (-len(form), form))
    folded = sorted({form.casefold() for form in ordered}, key=lambda form: (-len(form), form))
    # casefold, not lower: lower() maps a final sigma by context, so a secret's lowered
    # form is not always a substring of the lowered text that contains it.
    trigger = re.compile("|".join(map(re.escape, folded)) + "|" + _STATIC_TRIGGER)
    return _Matcher(trigger=trigger, secrets=re.compile("|".join(map(re.escape, ordered))))


_SECRET_NAME: Final = object()
_SCALARS: Final = frozenset({int, float, bool, type(None), bytes})


class Masker:
    """Masks strings and structures; owns the registry of known secret values.

    One process-wide instance (:data:`masker`) is the point: every sink must see every
    registered secret. Separate instances exist for tests and tools.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A refcount, not a set: two executions may resolve the same secret, and the one
        # that finishes first must not unmask it for the other.
        self._counts: Counter[str] = Counter()
        self._matcher = _compile(())

    # -- registry --------------------------------------------------------------------------

    def register(self, value: str) -> bool:
        """Mask ``value`` everywhere from now on; False (and ignored) when too short."""
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
            return False
        with self._lock:
            self._counts[value] += 1
            if self._counts[value] == 1:
                self._matcher = _compile(self._counts)
        return True

    def unregister(self, value: str) -> None:
        """Drop one registration of ``value``; masking stops when the last one is gone."""
        with self._lock:
            if self._counts.get(value, 0) <= 0:
                return
            self._counts[value] -= 1
            if self._counts[value] == 0:
                del self._counts[value]
                self._matcher = _compile(self._counts)

    @contextmanager
    def registered(self, *values: str) -> Iterator[None]:
        """Register ``values`` for the duration of the block (what a step runner wants)."""
        done: list[str] = []
        try:
            for value in values:
                if self.register(value):
                    done.append(value)
            yield
        finally:
            for value in done:
                self.unregister(value)

    def registered_count(self) -> int:
        """How many distinct values are registered (for diagnostics, never the values)."""
        return len(self._counts)

    # -- masking ---------------------------------------------------------------------------
    #
    # The hot paths below inline the cache lookup instead of calling mask_text for every
    # string: a Python call costs as much as the lookup itself, and a log record holds a
    # dozen strings that are nearly all cache hits.

    def mask_text(self, text: str) -> str:
        """``text`` with every secret replaced by :data:`REDACTED`."""
        matcher = self._matcher
        cached = matcher.cache.get(text)
        return cached if cached is not None else self._mask_text_miss(text, matcher)

    def mask_value(self, obj: Any) -> Any:
        """A masked deep copy of ``obj`` (dicts, lists, tuples, sets; strings masked).

        Other scalars are returned as they are; unknown objects too (a sink that renders
        them as text masks that text, see the JSON log formatter).
        """
        return self._mask(obj, self._matcher)

    def mask_field(self, key: str, value: Any) -> Any:
        """``value`` masked as it would be under mapping key ``key``."""
        if is_secret_key(key):
            return _kept_reference(value)
        return self._mask(value, self._matcher)

    def mask_items(self, items: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
        """A masked dict built from ``(key, value)`` pairs, keys applied as in a mapping.

        What the logging filter calls with a record's extra attributes, without building
        an intermediate dict first.
        """
        return self._mask_items(items, self._matcher)

    def _mask_text_miss(self, text: str, matcher: _Matcher) -> str:
        if len(text) < MIN_SECRET_LENGTH or matcher.trigger.search(text.casefold()) is None:
            result = text
        else:
            result = self._mask_text_slow(text, matcher)
        if len(text) <= _CACHE_MAX_TEXT:
            cache = matcher.cache
            if len(cache) >= _CACHE_MAX_ENTRIES:
                cache.clear()  # crude but O(1) amortised; hot strings come back at once
            cache[text] = result
        return result

    def _mask_text_slow(self, text: str, matcher: _Matcher) -> str:
        if matcher.secrets is not None:
            text, count = matcher.secrets.subn(REDACTED, text)
            # The trigger also fires on registered values; once they are gone, most
            # strings have nothing left for the (much slower) shape patterns.
            if count and _STATIC_TRIGGER_RE.search(text.casefold()) is None:
                return text
        if text.lstrip()[:1] in ("{", "["):
            structured = self._mask_json_text(text, matcher)
            if structured is not None:
                return structured
        return _SHAPES_RE.sub(_replace_shape, text)

    def _mask_json_text(self, text: str, matcher: _Matcher) -> str | None:
        """The masked JSON text, or None when ``text`` is not a JSON object or array."""
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(parsed, dict | list):
            return None
        masked = self._mask(parsed, matcher)
        if masked == parsed:
            return text  # keep the original formatting when there was nothing to mask
        return json.dumps(masked, ensure_ascii=False)

    def _mask(self, obj: Any, matcher: _Matcher) -> Any:
        cls = type(obj)
        if cls is str:
            cached = matcher.cache.get(obj)
            return cached if cached is not None else self._mask_text_miss(obj, matcher)
        if cls in _SCALARS:
            return obj
        if cls is dict:
            if len(obj) == 1 and is_secret_reference(obj):
                return dict(obj)
            return self._mask_items(obj.items(), matcher)
        if cls is list:
            return self._mask_list(obj, matcher)
        if cls is tuple:
            return tuple(self._mask_list(obj, matcher))
        if isinstance(obj, str):  # str subclasses (StrEnum…): keep the object when clean
            masked = self._mask_text_miss(str(obj), matcher)
            return obj if masked == obj else masked
        if isinstance(obj, Mapping):
            return self._mask_items(obj.items(), matcher)
        if isinstance(obj, list | tuple):
            return self._mask_list(obj, matcher)
        if isinstance(obj, set | frozenset):
            return cls(self._mask_list(obj, matcher))
        return obj

    def _mask_list(self, items: Iterable[Any], matcher: _Matcher) -> list[Any]:
        cache_get = matcher.cache.get
        out: list[Any] = []
        append = out.append
        for item in items:
            if type(item) is str:
                masked = cache_get(item)
                append(masked if masked is not None else self._mask_text_miss(item, matcher))
            else:
                append(self._mask(item, matcher))
        return out

    def _mask_items(self, items: Iterable[tuple[Any, Any]], matcher: _Matcher) -> dict[Any, Any]:
        cache_get = matcher.cache.get
        names_get = matcher.keys.get
        scalars = _SCALARS
        out: dict[Any, Any] = {}
        for key, value in items:
            name = names_get(key)
            if name is None:
                name = self._decide_key(key, matcher)
            if name is _SECRET_NAME:
                out[key] = _kept_reference(value)
                continue
            cls = type(value)
            if cls is str:
                masked = cache_get(value)
                out[name] = masked if masked is not None else self._mask_text_miss(value, matcher)
            elif cls in scalars:
                out[name] = value
            elif cls is list:  # the common containers skip the generic dispatch
                out[name] = self._mask_list(value, matcher)
            elif cls is dict and not (len(value) == 1 and is_secret_reference(value)):
                out[name] = self._mask_items(value.items(), matcher)
            else:
                out[name] = self._mask(value, matcher)
        return out

    def _decide_key(self, key: Any, matcher: _Matcher) -> Any:
        """``_SECRET_NAME`` for a secret-shaped key, else the key, masked if a string."""
        if type(key) is not str:
            return key  # not cached: 1 == True == 1.0 would share an entry
        name = _SECRET_NAME if is_secret_key(key) else self._mask_text_miss(key, matcher)
        names = matcher.keys
        if len(names) >= _CACHE_MAX_ENTRIES:
            names.clear()
        names[key] = name
        return name


def _kept_reference(value: Any) -> Any:
    """What survives under a secret-shaped key: references, nothing else."""
    if is_secret_reference(value):
        return dict(value)
    if type(value) in (list, tuple) and value and all(is_secret_reference(item) for item in value):
        return type(value)(dict(item) for item in value)
    return REDACTED


masker: Final = Masker()
"""The process-wide masker; its registry is the one every sink consults."""


def mask_text(text: str) -> str:
    """Mask a string with the process-wide :data:`masker`."""
    return masker.mask_text(text)


def mask_value(obj: Any) -> Any:
    """Deep-mask a value with the process-wide :data:`masker`; never mutates ``obj``."""
    return masker.mask_value(obj)


def register_secret(value: str) -> bool:
    """Register a resolved secret value for value-based masking (False if too short)."""
    return masker.register(value)


def unregister_secret(value: str) -> None:
    """Release one registration made by :func:`register_secret`."""
    masker.unregister(value)


@contextmanager
def registered_secrets(*values: str) -> Iterator[None]:
    """Register ``values`` on the process-wide masker for the duration of the block."""
    with masker.registered(*values):
        yield
