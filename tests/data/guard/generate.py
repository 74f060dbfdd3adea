#!/usr/bin/env python3
"""Writes the privacy guard's labelled corpus next to this file.

    python3 tests/data/guard/generate.py

* ``negatives.jsonl``: ``{"category": ..., "text": ...}``, snippets of what
  prompts carry (code, logs, payloads, ids, numbers) that hold no personal
  datum and no secret.
* ``positives.jsonl``: ``{"kind": ..., "value": ..., "text": ...}``, one
  secret or personal datum (``value``, found exactly once in ``text``) in a
  realistic context that holds nothing else to find.

Deterministic: every generator draws from its own ``random.Random`` seeded
from ``SEED`` and its name, so running this twice writes byte-identical
files, and changing one generator leaves the others' output alone. Standard
library only; if the ``phonenumbers`` package is installed, every phone
positive is also checked with ``is_valid_number`` (any that fails is dropped
and reported, which changes the output: the rules below are tuned so that
none fails with phonenumbers 8.13).
"""

import base64
import hashlib
import json
import os
import random
import re
import string
import sys
import zlib
from collections import Counter

SEED = 20250611
random.seed(SEED)
HERE = os.path.dirname(os.path.abspath(__file__))

try:  # optional: only used to check phone positives
    import phonenumbers  # type: ignore
except ImportError:  # pragma: no cover
    phonenumbers = None


def stream(name):
    """An independent, reproducible random stream for one generator."""
    return random.Random(f"{SEED}/{name}")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
DIGITS = string.digits
ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def rstr(rng, n, alphabet=ALNUM):
    return "".join(rng.choice(alphabet) for _ in range(n))


def rhex(rng, n):
    return rstr(rng, n, HEX)


def rdigits(rng, n, first="123456789"):
    return rng.choice(first) + rstr(rng, n - 1, DIGITS) if n else ""


def rbytes(rng, n):
    return bytes(rng.getrandbits(8) for _ in range(n))


def b64(data):
    return base64.b64encode(data).decode()


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def wrap(s, width=64):
    return "\n".join(s[i : i + width] for i in range(0, len(s), width))


def fill(template, **kw):
    """Replaces `<<name>>` with kw[name]; other text (braces, $, %) is left alone."""

    def sub(m):
        key = m.group(1)
        return str(kw[key]) if key in kw else m.group(0)

    return re.sub(r"<<(\w+)>>", sub, template)


def only_digits(s):
    return re.sub(r"\D", "", s)


def luhn_sum(digits):
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total


def luhn_ok(number):
    d = re.sub(r"\D", "", number)
    return luhn_sum(d) % 10 == 0


def luhn_complete(body):
    """body + the check digit that makes it pass Luhn."""
    for c in DIGITS:
        if luhn_sum(body + c) % 10 == 0:
            return body + c
    raise AssertionError("unreachable")


def group(s, sizes, sep=" "):
    out, i = [], 0
    for n in sizes:
        if i >= len(s):
            break
        out.append(s[i : i + n])
        i += n
    if i < len(s):
        out.append(s[i:])
    return sep.join(out)


def uuid_fmt(b, upper=False):
    h = b.hex()
    s = f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    return s.upper() if upper else s


def uuid4(rng, upper=False):
    b = bytearray(rbytes(rng, 16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid_fmt(bytes(b), upper)


def uuid7(rng, upper=False, ms=None):
    ms = ms if ms is not None else rng.randint(1_650_000_000_000, 1_760_000_000_000)
    b = bytearray(ms.to_bytes(6, "big") + rbytes(rng, 10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid_fmt(bytes(b), upper)


def uuid1(rng, upper=False):
    # 100 ns intervals since 1582-10-15, for a time in 2019-2025.
    t = (rng.randint(1_550_000_000, 1_750_000_000) * 10_000_000) + rng.randint(0, 9_999_999)
    t += 0x01B21DD213814000
    time_low = t & 0xFFFFFFFF
    time_mid = (t >> 32) & 0xFFFF
    time_hi = ((t >> 48) & 0x0FFF) | 0x1000
    clock = rng.getrandbits(14) | 0x8000
    node = rng.getrandbits(48)
    s = f"{time_low:08x}-{time_mid:04x}-{time_hi:04x}-{clock:04x}-{node:012x}"
    return s.upper() if upper else s


def weighted(rng, pairs):
    total = sum(w for _, w in pairs)
    x = rng.uniform(0, total)
    for item, w in pairs:
        x -= w
        if x <= 0:
            return item
    return pairs[-1][0]


# --------------------------------------------------------------------------
# The guard's patterns as of this corpus (a frozen copy of src/guard.rs).
# Used only to keep positives clean: a positive's context must hold nothing
# these patterns flag outside the value itself, so that "exactly one
# finding" holds whatever the detector of the day does with the value.
# --------------------------------------------------------------------------

_DATE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|^\d{1,2}[-/.]\d{1,2}[-/.]\d{4}")


def _card_check(s):
    d = re.sub(r"\D", "", s)
    if not 13 <= len(d) <= 19 or len(set(d)) == 1:
        return False
    return luhn_sum(d) % 10 == 0 and d[0] in "23456"


def iban_ok(s):
    c = re.sub(r"\s", "", s)
    if not 15 <= len(c) <= 34:
        return False
    r = c[4:] + c[:4]
    try:
        n = "".join(str(int(ch, 36)) for ch in r)
    except ValueError:
        return False
    return int(n) % 97 == 1


def ssn_ok(s):
    d = re.sub(r"\D", "", s)
    area, grp, serial = int(d[:3]), int(d[3:5]), int(d[5:])
    return area != 0 and area != 666 and area < 900 and grp != 0 and serial != 0


def _phone_check(s):
    count = len(re.sub(r"\D", "", s))
    intl = s.startswith("+")
    groups = [len(g) for g in re.split(r"\D", s) if g]
    if not intl and not s.startswith("(") and len(groups) >= 3 and all(g == 4 for g in groups[:3]):
        return False
    ok = 8 <= count <= 15 if intl else 10 <= count <= 15
    return ok and not _DATE.match(s)


_A = re.ASCII
GUARD_PATTERNS = [
    ("pem_private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)"), None),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}", _A), None),
    ("openai_key", re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", _A), None),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", _A), None),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", _A), None),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}", _A), None),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b", _A), None),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", _A), iban_ok),
    ("payment_card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b", _A), _card_check),
    ("us_ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b", _A), ssn_ok),
    ("phone", re.compile(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,5}\b", _A), _phone_check),
]


def guard_scan(text):
    """(kind, start, end) for each finding; earlier patterns win overlaps."""
    found = []
    for kind, pattern, check in GUARD_PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < e and s < m.end() for _, s, e in found):
                continue
            if check is None or check(m.group(0)):
                found.append((kind, m.start(), m.end()))
    return sorted(found, key=lambda f: f[1])


# Strict look-ups for negatives: none of these may occur in a negative.
STRICT_NEGATIVE = [
    ("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")),
    ("pem", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY")),
    ("jwt", re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")),
    ("openai", re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")),
    ("github", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_)")),
    ("slack", re.compile(r"\bx(?:ox[a-z]|app)-[A-Za-z0-9-]{8,}")),
    ("aws", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
]
PHONE_WORDS = re.compile(r"(?i)\b(?:phone|tel|fax|mobile|mob|cell|whatsapp|telefon|call me|sms)\b")

TEST_CARDS = [
    "4242424242424242", "4111111111111111", "5555555555554444", "378282246310005",
    "6011111111111117", "3530111333300000", "4000056655665556", "5105105105105100",
    "371449635398431", "30569309025904", "38520000023237", "6011000990139424",
    "3566002020360505", "4012888888881881", "4222222222222", "5200828282828210",
    "2223003122003222", "6200000000000005",
]
DOC_AWS_KEYS = ["AKIAIOSFODNN7EXAMPLE", "AKIAI44QH8DHBEXAMPLE"]


def negative_problems(category, text):
    """Why a negative candidate is unusable (empty when it is fine)."""
    problems = []
    for name, pattern in STRICT_NEGATIVE:
        for m in pattern.finditer(text):
            if name == "aws" and category == "docs_example_key" and m.group(0).endswith("EXAMPLE"):
                continue
            problems.append(name)
    for m in GUARD_PATTERNS[7][1].finditer(text):
        if iban_ok(m.group(0)):
            problems.append("iban")
    for m in GUARD_PATTERNS[9][1].finditer(text):
        if ssn_ok(m.group(0)):
            problems.append("ssn")
    if PHONE_WORDS.search(text.replace("Mobile/", "").replace("Mobile Safari", "")):
        problems.append("phone word")
    if re.search(r"\+\d{1,3}[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}", text):
        problems.append("international phone shape")
    for m in GUARD_PATTERNS[8][1].finditer(text):
        d = re.sub(r"\D", "", m.group(0))
        if luhn_ok(d) and category not in LUHN_ALLOWED and looks_like_card(d):
            problems.append("card-shaped")
    return problems


def looks_like_card(d):
    """A network prefix and length (real cards, not just Luhn-valid ids)."""
    n = len(d)
    if d.startswith("4") and n in (13, 16, 19):
        return True
    if (51 <= int(d[:2]) <= 55 or 2221 <= int(d[:4]) <= 2720) and n == 16:
        return True
    if d[:2] in ("34", "37") and n == 15:
        return True
    if (d.startswith("6011") or d[:2] == "65" or 644 <= int(d[:3]) <= 649) and n in (16, 19):
        return True
    if 3528 <= int(d[:4]) <= 3589 and n in (16, 19):
        return True
    if (d[:2] in ("36", "38") or 300 <= int(d[:3]) <= 305) and n == 14:
        return True
    if d[:2] == "62" and 16 <= n <= 19:
        return True
    if d[:4] in ("5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763") and 12 <= n <= 19:
        return True
    return False


# Categories whose very point is a Luhn-valid number in a non-card context.
LUHN_ALLOWED = {"test_card_docs"}


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

SERVICES = [
    "billing-api", "auth-service", "inventory", "search-indexer", "checkout", "notification-worker",
    "ledger", "edge-gateway", "catalog", "recommendations", "report-builder", "image-resizer",
    "scheduler", "payments-adapter", "geo-service", "feature-flags", "rate-limiter", "session-store",
    "metrics-exporter", "audit-trail", "export-worker", "pricing-engine", "shipping-quotes",
    "webhook-dispatcher", "thumbnailer", "tokenizer", "embeddings", "vector-store", "ingest",
    "etl-runner", "cart", "fulfilment", "warehouse-sync", "media-proxy", "config-server",
    "job-queue", "status-page", "pdf-renderer", "translation", "usage-meter", "quota-service",
]
NOUNS = [
    "order", "invoice", "shipment", "product", "cart", "session", "tenant", "job", "batch", "report",
    "widget", "record", "event", "chunk", "document", "payload", "segment", "bucket", "manifest",
    "snapshot", "schema", "metric", "quota", "ticket", "upload", "thumbnail", "index", "cursor",
    "lease", "checkpoint", "partition", "route", "plan", "rule", "token_count", "price", "sku",
]
VERBS = [
    "fetch", "load", "parse", "build", "render", "sync", "compute", "validate", "resolve",
    "dispatch", "flush", "merge", "refresh", "encode", "decode", "normalize", "reconcile",
    "schedule", "retry", "index", "split", "collect", "emit", "apply", "prune", "hydrate",
]
ADJ = ["pending", "stale", "active", "archived", "partial", "cached", "failed", "draft", "primary", "shadow"]
ENVS = ["prod", "staging", "dev", "qa", "canary", "eu-west", "us-east", "sandbox"]
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2", "ap-northeast-1", "ca-central-1", "sa-east-1"]
LANG_EXT = {"rust": "rs", "python": "py", "js": "js", "ts": "ts", "go": "go", "java": "java", "c": "c"}
TABLES = ["orders", "order_items", "invoices", "products", "shipments", "events", "jobs", "sessions",
          "inventory_levels", "price_history", "warehouses", "api_calls", "usage_daily", "tenants",
          "feature_flags", "audit_events", "refunds", "carriers", "skus", "batches"]
WORDS = ["alpha", "bravo", "cobalt", "delta", "ember", "falcon", "granite", "harbor", "indigo", "juniper",
         "krypton", "lumen", "meridian", "nimbus", "onyx", "pylon", "quartz", "raven", "sierra", "tundra",
         "umber", "vertex", "willow", "xenon", "yarrow", "zephyr"]
HTTP_PATHS = ["/api/v1/orders", "/api/v2/products", "/healthz", "/readyz", "/metrics", "/v1/chat/completions",
              "/v1/embeddings", "/static/app.js", "/static/css/main.css", "/favicon.ico", "/api/v1/search",
              "/api/v1/invoices", "/graphql", "/api/v1/carts", "/api/v1/shipments", "/login", "/assets/logo.svg",
              "/robots.txt", "/api/v1/reports/export", "/api/v1/webhooks", "/v1/models", "/docs"]
DOMAINS = ["shop.example.net", "api.example.org", "docs.example.com", "cdn.example.net", "status.example.org",
           "app.example.com", "internal.example.net", "portal.example.org"]
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "curl/8.5.0", "python-requests/2.31.0", "Go-http-client/2.0", "kube-probe/1.29",
    "Prometheus/2.51.2", "okhttp/4.12.0", "axios/1.6.8", "Wget/1.21.4", "node-fetch/1.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
]


def svc(rng):
    return rng.choice(SERVICES)


def ident(rng, style="snake"):
    v, n = rng.choice(VERBS), rng.choice(NOUNS)
    if style == "snake":
        return f"{v}_{n}"
    if style == "camel":
        parts = n.split("_")
        return v + "".join(p.capitalize() for p in parts)
    if style == "pascal":
        return "".join(p.capitalize() for p in (v + "_" + n).split("_"))
    return f"{v}-{n}".replace("_", "-")


def type_name(rng):
    return "".join(p.capitalize() for p in rng.choice(NOUNS).split("_")) + rng.choice(
        ["", "Config", "Request", "Response", "State", "Summary", "Key", "Entry", "Event", "Error"]
    )


def private_ipv4(rng):
    k = rng.randrange(5)
    if k == 0:
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if k == 1:
        return f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if k == 2:
        return f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    base = rng.choice(["192.0.2", "198.51.100", "203.0.113"])
    return f"{base}.{rng.randint(1, 254)}"


def ipv6(rng):
    k = rng.randrange(3)
    if k == 0:
        return "2001:db8:" + ":".join(f"{rng.getrandbits(16):x}" for _ in range(rng.randint(2, 6))).rstrip(":") + ("::1" if rng.random() < 0.3 else "")
    if k == 1:
        return "fe80::" + ":".join(f"{rng.getrandbits(16):x}" for _ in range(4))
    return "fd00:" + ":".join(f"{rng.getrandbits(16):x}" for _ in range(3)) + "::" + f"{rng.getrandbits(16):x}"


def epoch_s(rng):
    return rng.randint(1_600_000_000, 1_760_000_000)


def iso_ts(rng, t=None, ms=True, z=True):
    import datetime as _dt

    t = t if t is not None else epoch_s(rng)
    d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    s = d.strftime("%Y-%m-%dT%H:%M:%S")
    if ms:
        s += f".{rng.randint(0, 999):03d}"
    return s + ("Z" if z else "+00:00")


def clf_ts(rng, t=None):
    import datetime as _dt

    t = t if t is not None else epoch_s(rng)
    d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    return d.strftime("%d/%b/%Y:%H:%M:%S +0000")


def plain_ts(rng, t=None, ms=False):
    import datetime as _dt

    t = t if t is not None else epoch_s(rng)
    d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    s = d.strftime("%Y-%m-%d %H:%M:%S")
    return s + (f",{rng.randint(0, 999):03d}" if ms else "")


def date_only(rng, t=None):
    import datetime as _dt

    t = t if t is not None else epoch_s(rng)
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d")


def semver(rng, pre=True):
    v = f"{rng.randint(0, 4)}.{rng.randint(0, 30)}.{rng.randint(0, 20)}"
    if pre and rng.random() < 0.3:
        v += "-" + rng.choice(["alpha", "beta", "rc"]) + f".{rng.randint(1, 9)}"
    return v


def k8s_suffix(rng):
    return rstr(rng, 10, "bcdfghjklmnpqrstvwxz2456789")[: rng.choice([9, 10])] + "-" + rstr(rng, 5, "bcdfghjklmnpqrstvwxz2456789")


def pick_n(rng, seq, n):
    return rng.sample(seq, min(n, len(seq)))


# --------------------------------------------------------------------------
# Positives: values
# --------------------------------------------------------------------------

FIRST = ["Jane", "Omar", "Priya", "Lukas", "Mei", "Carlos", "Aisha", "Tom", "Ingrid", "Kenji", "Fatima",
         "Diego", "Chloe", "Mateo", "Sofia", "Arjun", "Hannah", "Yusuf", "Elena", "Noah", "Zoe", "Ravi",
         "Amara", "Felix", "Leila", "Marcus", "Nadia", "Oliver", "Paula", "Quentin", "Rosa", "Stefan",
         "Tara", "Ugo", "Vera", "Wen", "Ximena", "Yara", "Zaid", "Bea", "Ciaran", "Dalia", "Emeka"]
LAST = ["Doe", "Haddad", "Raman", "Becker", "Chen", "Alvarez", "Khan", "Okafor", "Larsen", "Tanaka",
        "Rossi", "Dubois", "Novak", "Kowalski", "Silva", "Nguyen", "Murphy", "Schmidt", "Costa", "Ivanova",
        "Patel", "Jensen", "Moreau", "Fischer", "Garcia", "Okoye", "Sato", "Lindqvist", "Mendes", "Byrne",
        "Horvath", "Yilmaz", "Andersson", "Kim", "Wright", "Petrov", "Hughes", "Ferreira", "Abbott", "Vance"]
COMPANIES = ["Acme Analytics", "Northwind Traders", "Bluefin Labs", "Copperleaf GmbH", "Lumen & Pine",
             "Stratus Health", "Kestrel Logistics", "Orchard Retail", "Vireo Software", "Halcyon Media",
             "Tidewater Bank", "Quillon SAS", "Brightpath Studio", "Granite Peak LLC", "Nordlys AS",
             "Saffron Foods", "Atlas Freight", "Meridian Insurance", "Fjord Digital", "Cobalt Robotics"]


def person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


# ---- PEM private keys ------------------------------------------------------


def der_len(n):
    if n < 128:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def der(tag, content):
    return bytes([tag]) + der_len(len(content)) + content


def der_seq(*parts):
    return der(0x30, b"".join(parts))


def der_uint(rng, nbytes, top=True):
    b = bytearray(rbytes(rng, nbytes))
    if top:
        b[0] |= 0x80
    b = bytes(b).lstrip(b"\x00") or b"\x00"
    if b[0] & 0x80:
        b = b"\x00" + b
    return der(0x02, b)


def der_small(v):
    b = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return der(0x02, b)


def der_oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return der(0x06, bytes(out))


DER_NULL = b"\x05\x00"


def rsa_pkcs1(rng, bits):
    n = bits // 8
    h = n // 2
    return der_seq(der_small(0), der_uint(rng, n), der_small(65537), der_uint(rng, n, top=False),
                   der_uint(rng, h), der_uint(rng, h), der_uint(rng, h, top=False),
                   der_uint(rng, h, top=False), der_uint(rng, h, top=False))


def pkcs8(alg_seq, key):
    return der_seq(der_small(0), alg_seq, der(0x04, key))


def ec_sec1(rng, curve):
    size = {"1.2.840.10045.3.1.7": 32, "1.3.132.0.34": 48, "1.3.132.0.10": 32}[curve]
    point = b"\x00\x04" + rbytes(rng, 2 * size)
    return der_seq(der_small(1), der(0x04, rbytes(rng, size)), der(0xA0, der_oid(curve)), der(0xA1, der(0x03, point)))


def ec_pkcs8(rng, curve):
    size = {"1.2.840.10045.3.1.7": 32, "1.3.132.0.34": 48}[curve]
    inner = der_seq(der_small(1), der(0x04, rbytes(rng, size)), der(0xA1, der(0x03, b"\x00\x04" + rbytes(rng, 2 * size))))
    return pkcs8(der_seq(der_oid("1.2.840.10045.2.1"), der_oid(curve)), inner)


def ed25519_pkcs8(rng):
    return pkcs8(der_seq(der_oid("1.3.101.112")), der(0x04, rbytes(rng, 32)))


def dsa_key(rng):
    return der_seq(der_small(0), der_uint(rng, 256), der_uint(rng, 32), der_uint(rng, 256, top=False),
                   der_uint(rng, 256, top=False), der_uint(rng, 32, top=False))


def encrypted_pkcs8(rng, inner_len):
    salt, iv = rbytes(rng, rng.choice([8, 16])), rbytes(rng, 16)
    iters = rng.choice([2048, 10000, 100000])
    kdf = der_seq(der_oid("1.2.840.113549.1.5.12"),
                  der_seq(der(0x04, salt), der_small(iters), der_seq(der_oid("1.2.840.113549.2.9"), DER_NULL)))
    enc = der_seq(der_oid("2.16.840.1.101.3.4.1.42"), der(0x04, iv))
    alg = der_seq(der_oid("1.2.840.113549.1.5.13"), der_seq(kdf, enc))
    blocks = (inner_len // 16 + 1) * 16
    return der_seq(alg, der(0x04, rbytes(rng, blocks)))


def ssh_string(b):
    return len(b).to_bytes(4, "big") + b


def ssh_mpint(rng, nbytes, top=True):
    b = bytearray(rbytes(rng, nbytes))
    if top:
        b[0] |= 0x80
    b = bytes(b)
    if b[0] & 0x80:
        b = b"\x00" + b
    return ssh_string(b)


def openssh_key(rng, kind, comment, encrypted=False):
    if kind == "ed25519":
        pub = rbytes(rng, 32)
        pubblob = ssh_string(b"ssh-ed25519") + ssh_string(pub)
        privpart = ssh_string(b"ssh-ed25519") + ssh_string(pub) + ssh_string(rbytes(rng, 32) + pub)
    else:
        e = ssh_string(b"\x01\x00\x01")
        n = ssh_mpint(rng, 256 if kind == "rsa2048" else 384)
        pubblob = ssh_string(b"ssh-rsa") + e + n
        privpart = (ssh_string(b"ssh-rsa") + n + e + ssh_mpint(rng, 256, False) + ssh_mpint(rng, 128, False)
                    + ssh_mpint(rng, 128) + ssh_mpint(rng, 128))
    check = rbytes(rng, 4)
    priv = check + check + privpart + ssh_string(comment.encode())
    block = 16 if encrypted else 8
    pad = 1
    while len(priv) % block:
        priv += bytes([pad])
        pad += 1
    if encrypted:
        head = ssh_string(b"aes256-ctr") + ssh_string(b"bcrypt") + ssh_string(ssh_string(rbytes(rng, 16)) + (16).to_bytes(4, "big"))
        priv = rbytes(rng, len(priv))
    else:
        head = ssh_string(b"none") + ssh_string(b"none") + ssh_string(b"")
    blob = b"openssh-key-v1\x00" + head + (1).to_bytes(4, "big") + ssh_string(pubblob) + ssh_string(priv)
    return wrap(b64(blob), 70)


def crc24(data):
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def pgp_block(rng):
    # An old-format secret-key packet (tag 5) and a user id and subkey, as bytes.
    body = bytes([4]) + rng.randint(1_600_000_000, 1_750_000_000).to_bytes(4, "big") + bytes([rng.choice([1, 22])])
    body += rbytes(rng, rng.choice([900, 1300, 1800]))
    packet = bytes([0x95]) + len(body).to_bytes(2, "big") + body
    packet += bytes([0xB4, 0x10]) + rbytes(rng, 16) + bytes([0x9D, 0x03, 0x98]) + rbytes(rng, 920)
    lines = ["-----BEGIN PGP PRIVATE KEY BLOCK-----"]
    if rng.random() < 0.4:
        lines.append(rng.choice(["Comment: GPGTools - https://gpgtools.org", "Version: GnuPG v2",
                                 "Comment: exported for the release signing box"]))
    lines.append("")
    lines.append(wrap(b64(packet), 64))
    lines.append("=" + b64(crc24(packet).to_bytes(3, "big")))
    lines.append("-----END PGP PRIVATE KEY BLOCK-----")
    return "\n".join(lines)


def pem(label, der_bytes, headers=None):
    out = [f"-----BEGIN {label}-----"]
    if headers:
        out += headers + [""]
    out.append(wrap(b64(der_bytes), 64))
    out.append(f"-----END {label}-----")
    return "\n".join(out)


def gen_pem(rng):
    k = weighted(rng, [("rsa1", 22), ("pkcs8rsa", 14), ("pkcs8ec", 8), ("pkcs8ed", 6), ("ec", 12),
                       ("ssh_ed", 12), ("ssh_rsa", 5), ("ssh_enc", 3), ("enc8", 8), ("rsa_legacy_enc", 5),
                       ("dsa", 3), ("pgp", 5)])
    if k == "rsa1":
        return pem("RSA PRIVATE KEY", rsa_pkcs1(rng, weighted(rng, [(2048, 8), (3072, 1), (4096, 1), (1024, 1)])))
    if k == "pkcs8rsa":
        alg = der_seq(der_oid("1.2.840.113549.1.1.1"), DER_NULL)
        return pem("PRIVATE KEY", pkcs8(alg, rsa_pkcs1(rng, rng.choice([2048, 2048, 3072]))))
    if k == "pkcs8ec":
        return pem("PRIVATE KEY", ec_pkcs8(rng, rng.choice(["1.2.840.10045.3.1.7", "1.3.132.0.34"])))
    if k == "pkcs8ed":
        return pem("PRIVATE KEY", ed25519_pkcs8(rng))
    if k == "ec":
        return pem("EC PRIVATE KEY", ec_sec1(rng, rng.choice(["1.2.840.10045.3.1.7", "1.2.840.10045.3.1.7", "1.3.132.0.34", "1.3.132.0.10"])))
    if k in ("ssh_ed", "ssh_rsa", "ssh_enc"):
        comment = rng.choice(["deploy", "ci-runner", "backup", "build-agent", "laptop-2023", "", "jump-host"])
        kind = "ed25519" if k != "ssh_rsa" else rng.choice(["rsa2048", "rsa3072"])
        body = openssh_key(rng, kind, comment, encrypted=(k == "ssh_enc"))
        return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----"
    if k == "enc8":
        return pem("ENCRYPTED PRIVATE KEY", encrypted_pkcs8(rng, rng.choice([138, 1218, 1794, 67])))
    if k == "rsa_legacy_enc":
        cipher = rng.choice(["AES-128-CBC", "AES-256-CBC", "DES-EDE3-CBC"])
        iv = rstr(rng, 32 if cipher.startswith("AES") else 16, "0123456789ABCDEF")
        return pem("RSA PRIVATE KEY", rbytes(rng, 1200 if rng.random() < 0.8 else 1760),
                   headers=["Proc-Type: 4,ENCRYPTED", f"DEK-Info: {cipher},{iv}"])
    if k == "dsa":
        return pem("DSA PRIVATE KEY", dsa_key(rng))
    return pgp_block(rng)


def fake_cert(rng):
    body = der_seq(der_seq(der(0xA0, der_small(2)), der_uint(rng, 16)), rbytes(rng, rng.choice([420, 560, 700])))
    return pem("CERTIFICATE", body)


def indent_block(block, prefix):
    return block.replace("\n", "\n" + prefix)


def ctx_pem(rng, key):
    """(text, value): the value is the block as it appears in the text."""
    host = rng.choice(["bastion-01", "build-02", "prod-db-3", "git-mirror", "vpn-gw", "staging-web-1"])
    user = rng.choice(["ubuntu", "ec2-user", "deploy", "git", "admin", "root"])
    name = rng.choice(["id_ed25519", "id_rsa", "deploy_key", "server.key", "tls.key", "signing.pem", "jwt-private.pem", "client.key"])
    if "PGP" in key:
        name = rng.choice(["release-signing.asc", "secring.asc", "backup-key.asc", "maintainer.asc"])
        t = rng.choice([6, 10, 13, 14, 16, 17])
    elif "OPENSSH" in key:
        name = rng.choice(["id_ed25519", "id_rsa", "deploy_key", "ci_key"])
        t = rng.choice([0, 1, 6, 8, 10, 11, 13, 15, 18])
    else:
        t = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 18])
    if t == 0:
        return f"I'm trying to ssh into {host} and get 'invalid format'. Here is the key file:\n\n{key}\n\nWhat am I doing wrong?", key
    if t == 1:
        return f"$ cat ~/.ssh/{name}\n{key}\n$ ssh -i ~/.ssh/{name} -l {user} {host}.internal\nLoad key \"/home/{user}/.ssh/{name}\": error in libcrypto", key
    if t == 2:
        ns = rng.choice(["default", "payments", "ingress", "platform"])
        cert = fake_cert(rng)
        v = indent_block(key, "    ")
        return ("apiVersion: v1\nkind: Secret\nmetadata:\n  name: " + rng.choice(["tls-cert", "api-tls", "webhook-certs"])
                + f"\n  namespace: {ns}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n    " + indent_block(cert, "    ")
                + "\n  tls.key: |\n    " + v + "\n"), v
    if t == 3:
        esc = key.replace("\n", "\\n")
        proj = rng.choice(["acme-prod", "ml-pipeline-37", "analytics-dev", "shop-backend"])
        return ('{\n  "type": "service_account",\n  "project_id": "' + proj + '",\n  "private_key_id": "' + rhex(rng, 40)
                + '",\n  "private_key": "' + esc + '\\n",\n  "token_uri": "https://oauth2.googleapis.com/token"\n}'), esc
    if t == 4:
        return f'PRIVATE_KEY = """{key}"""\n\ndef sign(payload: bytes) -> bytes:\n    key = serialization.load_pem_private_key(PRIVATE_KEY.encode(), password=None)\n    return key.sign(payload, ec.ECDSA(hashes.SHA256()))', key
    if t == 5:
        return f'resource "tls_locally_signed_cert" "{rng.choice(WORDS)}" {{\n  ca_private_key_pem = <<EOT\n{key}\nEOT\n  validity_period_hours = 8760\n}}', key
    if t == 6:
        return f"Can you tell me what format this is and how to convert it? The tool says 'unable to load key'.\n\n```\n{key}\n```", key
    if t == 7:
        return f"{plain_ts(rng)} DEBUG config loaded: signing_key=\n{key}\n{plain_ts(rng)} INFO  listening on :{rng.choice([8443, 9443, 443])}", key
    if t == 8:
        v = indent_block(key, "      ")
        return f"- name: Install deploy key\n  copy:\n    dest: /home/{user}/.ssh/{name}\n    mode: '0600'\n    content: |\n      " + v, v
    if t == 9:
        return f'const privateKey = `{key}`;\n\nconst token = jwt.sign({{ sub: "svc-{rng.choice(SERVICES)}" }}, privateKey, {{ algorithm: "RS256", expiresIn: "1h" }});', key
    if t == 10:
        return f"Subject: {name} for {host}\n\nHi team, attaching the key inline since the upload failed:\n\n{key}\n\nPlease rotate after the migration. Thanks", key
    if t == 11:
        return f'SSH_PRIVATE_KEY="{key}"\nSSH_KNOWN_HOSTS_FILE=/etc/ssh/ssh_known_hosts\nDEPLOY_TARGET={host}', key
    if t == 12:
        return f"var signingKey = []byte(`{key}`)\n\nfunc loadKey() (*rsa.PrivateKey, error) {{\n\tblock, _ := pem.Decode(signingKey)\n\treturn x509.ParsePKCS1PrivateKey(block.Bytes)\n}}", key
    if t == 13:
        return f"$ git show HEAD~{rng.randint(1, 9)}:config/{name}\n{key}", key
    if t == 14:
        return f"Why does `gpg --import` fail on this? It says 'no valid OpenPGP data found'.\n{key}", key
    if t == 15:
        v = indent_block(key, "+")
        return f"--- /dev/null\n+++ b/deploy/{name}\n@@ -0,0 +1,{key.count(chr(10)) + 1} @@\n+{v}", v
    if t == 16:
        return f"$ gpg --export-secret-keys --armor {rhex(rng, 16).upper()} > {name}\n$ cat {name}\n{key}", key
    if t == 17:
        return f"release:\n  sign: true\n  gpg_private_key: |\n    {indent_block(key, '    ')}\n  passphrase_env: GPG_PASSPHRASE", indent_block(key, "    ")
    return f"# {name} (do not commit)\n{key}\n", key


# ---- JWTs ------------------------------------------------------------------


ISSUERS = ["https://auth.example-login.com/", "https://login.microsoftonline.com/" + "{tenant}/v2.0",
           "https://accounts.google.com", "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Ab12Cd34E",
           "https://id.northwind.io", "https://sso.bluefin-labs.dev/realms/main", "https://api.vireo.app"]


def gen_jwt(rng):
    alg = weighted(rng, [("HS256", 30), ("RS256", 35), ("ES256", 12), ("PS256", 4), ("EdDSA", 4), ("HS512", 5), ("RS512", 3)])
    header = {"alg": alg, "typ": rng.choice(["JWT", "JWT", "JWT", "at+jwt"])}
    if alg != "HS256" or rng.random() < 0.3:
        header["kid"] = rng.choice([rhex(rng, 16), rstr(rng, 27, B64URL), uuid4(rng), f"key-{rng.randint(1, 40)}"])
    keys = list(header.keys())
    if rng.random() < 0.5:
        keys = ["typ", "alg"] + [k for k in keys if k not in ("typ", "alg")] if rng.random() < 0.5 else keys
    header = {k: header[k] for k in keys}
    iat = epoch_s(rng)
    claims = {}
    iss = rng.choice(ISSUERS).replace("{tenant}", uuid4(rng))
    if rng.random() < 0.8:
        claims["iss"] = iss
    claims["sub"] = rng.choice([uuid4(rng), str(rng.randint(10**6, 10**10)), "auth0|" + rhex(rng, 24), f"svc-{svc(rng)}", "user_" + rstr(rng, 24)])
    if rng.random() < 0.7:
        claims["aud"] = rng.choice(["api", "https://api.example-shop.com", svc(rng), ["web", "mobile"], "account"])
    claims["iat"] = iat
    claims["exp"] = iat + rng.choice([300, 900, 3600, 86400, 604800])
    if rng.random() < 0.5:
        claims["scope"] = " ".join(rng.sample(["openid", "profile", "read:orders", "write:orders", "offline_access", "admin", "read:reports"], rng.randint(1, 4)))
    if rng.random() < 0.4:
        claims["jti"] = uuid4(rng)
    if rng.random() < 0.3:
        claims["roles"] = rng.sample(["admin", "viewer", "editor", "billing", "support"], rng.randint(1, 2))
    if rng.random() < 0.3:
        claims["tenant_id"] = rstr(rng, 12, LOWER + DIGITS)
    sig_len = {"HS256": 32, "HS512": 64, "RS256": 256, "RS512": 256, "PS256": 256, "ES256": 64, "EdDSA": 64}[alg]
    enc = lambda o: b64url(json.dumps(o, separators=(",", ":")).encode())
    return f"{enc(header)}.{enc(claims)}.{b64url(rbytes(rng, sig_len))}"


def ctx_jwt(rng, tok):
    host = rng.choice(DOMAINS)
    path = rng.choice(HTTP_PATHS)
    t = rng.randrange(13)
    if t == 0:
        return f"curl -s https://{host}{path} \\\n  -H 'Authorization: Bearer {tok}' \\\n  -H 'Accept: application/json'"
    if t == 1:
        return f"GET {path} HTTP/1.1\nHost: {host}\nAuthorization: Bearer {tok}\nUser-Agent: {rng.choice(UAS)}\nAccept: */*"
    if t == 2:
        return json.dumps({"access_token": tok, "token_type": "Bearer", "expires_in": rng.choice([300, 3600, 7200]),
                           "scope": "openid profile"}, indent=2)
    if t == 3:
        return f"Why does jwt.io say 'invalid signature' for this token? The secret is in our vault.\n\n{tok}"
    if t == 4:
        return f"{iso_ts(rng)} WARN  [{svc(rng)}] token verification failed: ExpiredSignatureError token={tok}"
    if t == 5:
        return f"headers = {{\n    \"Authorization\": \"Bearer {tok}\",\n    \"Content-Type\": \"application/json\",\n}}\nresp = requests.get(\"https://{host}{path}\", headers=headers, timeout=10)"
    if t == 6:
        return f"localStorage.setItem('id_token', '{tok}');\nwindow.location.href = '/dashboard';"
    if t == 7:
        return f"Cookie: session={tok}; theme=dark; lang=en"
    if t == 8:
        return f"API_TOKEN={tok}\nAPI_BASE_URL=https://{host}\nLOG_LEVEL=debug"
    if t == 9:
        return f"const res = await fetch('https://{host}{path}', {{\n  headers: {{ Authorization: `Bearer {tok}` }},\n}});"
    if t == 10:
        return f"http --json POST https://{host}{path} 'Authorization:Bearer {tok}' name=test"
    if t == 11:
        return f"The webhook arrives with `X-Signature-Token: {tok}` and our middleware rejects it with 401. Is the audience wrong?"
    return f"[auth]\nmode = \"static\"\nbearer = \"{tok}\"\nrefresh_interval = \"{rng.choice([5, 15, 30])}m\""


# ---- OpenAI keys -----------------------------------------------------------


def key_chars(rng, n, extra=0.04):
    out = []
    for _ in range(n):
        out.append(rng.choice("-_") if rng.random() < extra else rng.choice(ALNUM))
    return "".join(out)


def gen_openai(rng):
    k = weighted(rng, [("proj", 45), ("svcacct", 15), ("admin", 10), ("legacy", 25), ("none", 5)])
    if k == "legacy":
        return "sk-" + rstr(rng, 20) + "T3BlbkFJ" + rstr(rng, 20)
    a, b = rng.randint(64, 80), rng.randint(64, 80)
    prefix = {"proj": "sk-proj-", "svcacct": "sk-svcacct-", "admin": "sk-admin-", "none": "sk-None-"}[k]
    if k == "admin":
        a, b = rng.randint(40, 60), rng.randint(40, 60)
    body = key_chars(rng, a) + "T3BlbkFJ" + key_chars(rng, b)
    return prefix + body.rstrip("-_") + rng.choice(ALNUM)


def ctx_openai(rng, key):
    model = rng.choice(["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "text-embedding-3-small", "gpt-3.5-turbo"])
    t = rng.randrange(13)
    if t == 0:
        return f"OPENAI_API_KEY={key}\nOPENAI_MODEL={model}\nREDIS_URL=redis://localhost:6379/0"
    if t == 1:
        return f"from openai import OpenAI\n\nclient = OpenAI(api_key=\"{key}\")\nresp = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"ping\"}}])"
    if t == 2:
        return f"curl https://api.openai.com/v1/chat/completions \\\n  -H \"Content-Type: application/json\" \\\n  -H \"Authorization: Bearer {key}\" \\\n  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
    if t == 3:
        return f"const openai = new OpenAI({{ apiKey: '{key}' }});\nconst r = await openai.embeddings.create({{ model: '{model}', input: docs }});"
    if t == 4:
        return f"export OPENAI_API_KEY='{key}'\npython scripts/eval.py --model {model} --limit 200"
    if t == 5:
        return f"I keep getting 401 'Incorrect API key provided' with this key even though it's new: {key} - is the project disabled?"
    if t == 6:
        return f"[llm]\nprovider = \"openai\"\nmodel = \"{model}\"\napi_key = \"{key}\"\ntimeout_s = 30"
    if t == 7:
        return f"docker run --rm -e OPENAI_API_KEY={key} -p 8080:8080 ghcr.io/{rng.choice(WORDS)}/chat-ui:latest"
    if t == 8:
        return f"llm = ChatOpenAI(model=\"{model}\", temperature=0, openai_api_key=\"{key}\")\nchain = prompt | llm | StrOutputParser()"
    if t == 9:
        return json.dumps({"openai": {"apiKey": key, "organization": "org-" + rstr(rng, 24), "model": model}}, indent=2)
    if t == 10:
        return f"env:\n  - name: OPENAI_API_KEY\n    value: \"{key}\"\n  - name: MODEL\n    value: {model}"
    if t == 11:
        return f"os.environ[\"OPENAI_API_KEY\"] = \"{key}\"  # TODO move to secrets manager"
    return f"$ openai api models.list\nError: invalid key. Using key {key} from ~/.config/openai/config"


# ---- AWS access keys -------------------------------------------------------


def gen_aws(rng):
    while True:
        k = rng.choice(["AKIA"] * 7 + ["ASIA"] * 3) + rstr(rng, 16, B32.replace("2", "") + "2")
        if not k.endswith("EXAMPLE"):
            return k


def ctx_aws(rng, key):
    profile = rng.choice(["default", "prod", "staging", "ci", "data-eng", "sandbox"])
    region = rng.choice(REGIONS)
    bucket = f"{rng.choice(WORDS)}-{rng.choice(['assets', 'backups', 'logs', 'exports', 'artifacts'])}"
    t = rng.randrange(12)
    if t == 0:
        return f"[{profile}]\naws_access_key_id = {key}\naws_secret_access_key = <in 1password>\nregion = {region}"
    if t == 1:
        return f"export AWS_ACCESS_KEY_ID={key}\nexport AWS_SECRET_ACCESS_KEY=\"$(pass show aws/{profile})\"\nexport AWS_DEFAULT_REGION={region}\naws s3 ls s3://{bucket}/"
    if t == 2:
        return f"s3 = boto3.client(\n    \"s3\",\n    aws_access_key_id=\"{key}\",\n    aws_secret_access_key=os.environ[\"AWS_SECRET_ACCESS_KEY\"],\n    region_name=\"{region}\",\n)"
    if t == 3:
        return json.dumps({"eventName": rng.choice(["GetObject", "PutObject", "AssumeRole", "ListBuckets"]),
                           "awsRegion": region, "sourceIPAddress": private_ipv4(rng),
                           "userIdentity": {"type": "IAMUser", "userName": rng.choice(["ci-deployer", "etl-bot", "backup-agent"]), "accessKeyId": key}}, indent=2)
    if t == 4:
        return f"Our scanner flagged {key} in a public gist from last week. Which IAM user owns it and how do I deactivate it?"
    if t == 5:
        return f"provider \"aws\" {{\n  region     = \"{region}\"\n  access_key = \"{key}\"\n  secret_key = var.aws_secret_key\n}}"
    if t == 6:
        return f"env:\n  AWS_ACCESS_KEY_ID: {key}\n  AWS_SECRET_ACCESS_KEY: ${{{{ secrets.AWS_SECRET_ACCESS_KEY }}}}\n  AWS_REGION: {region}"
    if t == 7:
        return f"const client = new S3Client({{\n  region: '{region}',\n  credentials: {{ accessKeyId: '{key}', secretAccessKey: process.env.AWS_SECRET }},\n}});"
    if t == 8:
        return f"{plain_ts(rng)} ERROR botocore: An error occurred (InvalidAccessKeyId) when calling the PutObject operation: The AWS Access Key Id you provided does not exist in our records. key={key}"
    if t == 9:
        return f"$ aws sts get-caller-identity --profile {profile}\nPartial credentials found in env, missing: AWS_SECRET_ACCESS_KEY\n(AWS_ACCESS_KEY_ID is {key})"
    if t == 10:
        return f"AWS_ACCESS_KEY_ID,{key}\nAWS_REGION,{region}\nBUCKET,{bucket}"
    return f"spark.hadoop.fs.s3a.access.key {key}\nspark.hadoop.fs.s3a.endpoint s3.{region}.amazonaws.com"


# ---- GitHub tokens ---------------------------------------------------------


BASE62 = DIGITS + UPPER + LOWER


def base62(n, width):
    s = ""
    while n:
        n, r = divmod(n, 62)
        s = BASE62[r] + s
    return s.rjust(width, "0")


def gen_github(rng):
    k = weighted(rng, [("ghp", 40), ("gho", 10), ("ghu", 8), ("ghs", 10), ("ghr", 7), ("pat", 25)])
    if k == "pat":
        return "github_pat_" + "11" + rstr(rng, 7, UPPER + DIGITS) + "0" + rstr(rng, 12) + "_" + rstr(rng, 59)
    body = rstr(rng, 30)
    return f"{k}_{body}{base62(zlib.crc32(body.encode()), 6)}"


def ctx_github(rng, tok):
    org, repo = rng.choice(WORDS) + "-" + rng.choice(["labs", "io", "hq", "dev"]), rng.choice(SERVICES)
    t = rng.randrange(12)
    if t == 0:
        return f"git remote set-url origin https://x-access-token:{tok}@github.com/{org}/{repo}.git\ngit push origin HEAD"
    if t == 1:
        return f"GITHUB_TOKEN={tok}\nGITHUB_OWNER={org}\nRENOVATE_PLATFORM=github"
    if t == 2:
        return f"//npm.pkg.github.com/:_authToken={tok}\n@{org}:registry=https://npm.pkg.github.com"
    if t == 3:
        return f"echo {tok} | docker login ghcr.io -u {rng.choice(['ci', 'release-bot', 'deployer'])} --password-stdin"
    if t == 4:
        return f"g = Github(\"{tok}\")\nrepo = g.get_repo(\"{org}/{repo}\")\nfor pr in repo.get_pulls(state=\"open\"):\n    print(pr.number, pr.title)"
    if t == 5:
        return f"curl -H \"Authorization: token {tok}\" https://api.github.com/repos/{org}/{repo}/actions/runs?per_page=5"
    if t == 6:
        return f"Secret scanning alert: a token was committed in {repo}/.env ({tok}). Revoke it and rotate the deploy keys."
    if t == 7:
        return f"provider \"github\" {{\n  owner = \"{org}\"\n  token = \"{tok}\"\n}}"
    if t == 8:
        return f"$ gh auth status\ngithub.com\n  - Logged in to github.com account {rng.choice(WORDS)}-bot (keyring)\n  - Token: {tok}\n  - Token scopes: 'repo', 'workflow'"
    if t == 9:
        return f"const octokit = new Octokit({{ auth: \"{tok}\" }});\nconst {{ data }} = await octokit.rest.issues.listForRepo({{ owner: \"{org}\", repo: \"{repo}\" }});"
    if t == 10:
        return f"[url \"https://x-access-token:{tok}@github.com/\"]\n\tinsteadOf = https://github.com/"
    return f"Why does `go get github.com/{org}/{repo}` still 404 after I set GOPRIVATE and GH token {tok}?"


# ---- Slack tokens ----------------------------------------------------------


def gen_slack(rng):
    k = weighted(rng, [("xoxb", 40), ("xoxp", 20), ("xoxa2", 8), ("xoxe", 12), ("xoxs", 8), ("xoxe_r", 5), ("xapp", 7)])
    team = rdigits(rng, rng.choice([10, 11, 12, 13]))
    if k == "xoxb":
        return f"xoxb-{team}-{rdigits(rng, 13)}-{rstr(rng, 24)}"
    if k == "xoxp":
        return f"xoxp-{team}-{rdigits(rng, rng.choice([11, 12, 13]))}-{rdigits(rng, 13)}-{rhex(rng, 32)}"
    if k == "xoxa2":
        return f"xoxa-2-{team}-{rdigits(rng, 13)}-{rdigits(rng, 13)}-{rhex(rng, 64)}"
    if k == "xoxe":
        return f"xoxe.xoxp-1-{rstr(rng, rng.randint(140, 160))}"
    if k == "xoxs":
        return f"xoxs-{team}-{rdigits(rng, 12)}-{rdigits(rng, 13)}-{rhex(rng, 64)}"
    if k == "xoxe_r":
        return f"xoxe-1-{rstr(rng, rng.randint(140, 160))}"
    return f"xapp-1-A{rstr(rng, 10, UPPER + DIGITS)}-{rdigits(rng, 13)}-{rhex(rng, 64)}"


def ctx_slack(rng, tok):
    chan = "#" + rng.choice(["deploys", "alerts", "ops", "release-notes", "support-escalations", "data-quality"])
    t = rng.randrange(11)
    if t == 0:
        return f"SLACK_BOT_TOKEN={tok}\nSLACK_CHANNEL={chan}\nSLACK_SIGNING_SECRET_FILE=/run/secrets/slack_signing"
    if t == 1:
        return f"from slack_sdk import WebClient\n\nclient = WebClient(token=\"{tok}\")\nclient.chat_postMessage(channel=\"{chan}\", text=\"Deploy finished\")"
    if t == 2:
        return f"curl -X POST https://slack.com/api/chat.postMessage \\\n  -H 'Authorization: Bearer {tok}' \\\n  -H 'Content-type: application/json' \\\n  --data '{{\"channel\":\"{chan}\",\"text\":\"hello\"}}'"
    if t == 3:
        return f"const app = new App({{\n  token: '{tok}',\n  signingSecret: process.env.SLACK_SIGNING_SECRET,\n}});"
    if t == 4:
        return f"notifications:\n  slack:\n    channel: \"{chan}\"\n    token: {tok}\n    on_failure: true"
    if t == 5:
        return f"{iso_ts(rng)} ERROR slack notify failed: invalid_auth (token={tok})"
    if t == 6:
        return f"Our bot stopped posting to {chan}; the token is {tok}. Did the workspace revoke it when we reinstalled the app?"
    if t == 7:
        return f"[slack]\ntoken = \"{tok}\"\ndefault_channel = \"{chan}\""
    if t == 8:
        return f"kubectl create secret generic slack-bot --from-literal=token={tok} -n {rng.choice(['ops', 'monitoring', 'default'])}"
    if t == 9:
        return json.dumps({"ok": True, "access_token": tok, "token_type": "bot", "scope": "chat:write,channels:read", "app_id": "A" + rstr(rng, 10, UPPER + DIGITS)}, indent=2)
    return f"alertmanager:\n  receivers:\n    - name: slack\n      slack_configs:\n        - channel: '{chan}'\n          http_config:\n            authorization:\n              credentials: {tok}"


# ---- E-mail addresses ------------------------------------------------------


TLDS = ["com", "com", "com", "io", "co.uk", "de", "fr", "dev", "app", "tech", "ai", "cloud", "org", "net",
        "com.au", "co.jp", "ac.uk", "edu", "nl", "es", "it", "ch", "museum", "photography", "consulting",
        "studio", "xyz", "agency", "co", "ca", "se", "email", "travel", "engineering", "eu", "us", "in"]
DOMAIN_WORDS = ["acme", "northwind", "bluefin", "copperleaf", "lumenpine", "stratus-health", "kestrel",
                "orchardretail", "vireo", "halcyon", "tidewater", "quillon", "brightpath", "granitepeak",
                "nordlys", "saffron", "atlas-freight", "meridian", "fjord", "cobalt-robotics", "gmail",
                "outlook", "proton", "fastmail", "yahoo", "icloud", "hey", "posteo", "gmx", "web"]


def gen_email(rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    f, l = first.lower(), last.lower()
    local = weighted(rng, [
        (f"{f}.{l}", 25), (f"{f[0]}{l}", 12), (f"{f}_{l}", 6), (f"{f}+{rng.choice(['news', 'shop', 'github', 'invoices', 'test'])}", 8),
        (f"{f}.{l}+{rng.choice(['work', 'receipts', 'dev'])}", 5), (f"{f}{rng.randint(1, 99)}", 8), (f"{f[0]}.{l}", 6),
        (f"{l}.{f}", 5), (f"{f}-{l}", 4), (rng.choice(["billing", "support", "hr", "accounts", "ops", "hello"]) + (f".{rng.choice(['eu', 'us', 'team'])}" if rng.random() < 0.3 else ""), 6),
        (f"{f}", 6), (f"{f}.{l}{rng.randint(70, 99)}", 5),
    ])
    w = rng.choice(DOMAIN_WORDS)
    tld = rng.choice(TLDS)
    dom = weighted(rng, [(f"{w}.{tld}", 70), (f"mail.{w}.{tld}", 8), (f"{rng.choice(['eng', 'corp', 'eu', 'us', 'research'])}.{w}.{tld}", 12), (f"{w}{rng.randint(2, 99)}.{tld}", 5), (f"{w}-{rng.choice(['group', 'labs', 'team'])}.{tld}", 5)])
    e = f"{local}@{dom}"
    if rng.random() < 0.08:
        e = e.upper()
    elif rng.random() < 0.1:
        e = local.capitalize() + "@" + dom
    return {"value": e, "name": f"{first} {last}"}


def ctx_email(rng, item):
    e, name = item["value"], item["name"]
    comp = rng.choice(COMPANIES)
    t = rng.randrange(18)
    if t == 0:
        return f"From: {name} <{e}>\nTo: undisclosed-recipients:;\nSubject: Re: Q{rng.randint(1, 4)} invoice\n\nHi, please see the attached statement."
    if t == 1:
        return f"Thanks for your help today!\n\n--\n{name}\n{rng.choice(['Head of Operations', 'Senior Engineer', 'Account Manager', 'CTO', 'Data Analyst'])}, {comp}\n{e}"
    if t == 2:
        return json.dumps({"id": rng.randint(1000, 99999), "name": name, "email": e, "plan": rng.choice(["free", "pro", "team"]), "created_at": iso_ts(rng)}, indent=2)
    if t == 3:
        return f"id,full_name,email,signup_date,plan\n{rng.randint(100, 9999)},{name},{e},{date_only(rng)},{rng.choice(['pro', 'free', 'enterprise'])}"
    if t == 4:
        return f"commit {rhex(rng, 40)}\nAuthor: {name} <{e}>\nDate:   {rng.choice(['Mon', 'Tue', 'Wed', 'Thu', 'Fri'])} Mar {rng.randint(1, 28)} {rng.randint(8, 19)}:{rng.randint(10, 59)}:{rng.randint(10, 59)} 2024 +0100\n\n    {rng.choice(['Fix flaky retry test', 'Bump deps', 'Add pagination to export', 'Handle empty cart'])}"
    if t == 5:
        return f"Hi, I can't log in since the password reset. My account is {e}, can you check what's wrong?"
    if t == 6:
        return f"{iso_ts(rng)} INFO  password reset requested user={e} ip={private_ipv4(rng)} request_id={uuid4(rng)}"
    if t == 7:
        return f"<p>Questions? Write to <a href=\"mailto:{e}\">our team</a>.</p>"
    if t == 8:
        return f"    {rng.choice(['Fix', 'Refactor', 'Document'])} the retry budget\n\n    Signed-off-by: {name} <{e}>"
    if t == 9:
        return json.dumps({"name": rng.choice(WORDS) + "-sdk", "version": semver(rng, False), "author": f"{name} <{e}>", "license": "MIT"}, indent=2)
    if t == 10:
        return f"INSERT INTO customers (id, display_name, email, locale) VALUES ({rng.randint(1, 99999)}, '{name}', '{e}', '{rng.choice(['en-GB', 'de-DE', 'fr-FR', 'en-US'])}');"
    if t == 11:
        return f"Please add {e} to the on-call rota for {rng.choice(SERVICES)} starting next week."
    if t == 12:
        return f"maintainers:\n  - name: {name}\n    email: {e}\n    github: {rng.choice(WORDS)}{rng.randint(1, 99)}"
    if t == 13:
        return f"Reply-To: {e}\nX-Mailer: {rng.choice(['Apple Mail (2.3774)', 'Microsoft Outlook 16.0', 'Thunderbird 115.9'])}\nContent-Type: text/plain; charset=UTF-8"
    if t == 14:
        return f"setup(\n    name=\"{rng.choice(WORDS)}-client\",\n    version=\"{semver(rng, False)}\",\n    author=\"{name}\",\n    author_email=\"{e}\",\n)"
    if t == 15:
        return f"Ticket #{rng.randint(10000, 99999)} - customer {name} ({e}) reports duplicate charges on the {rng.choice(['March', 'April', 'May'])} invoice."
    if t == 16:
        return f"Bonjour, vous pouvez me joindre à {e} pour la suite du dossier. Cordialement, {name}"
    return f"@{rng.choice(WORDS)} can you forward the report to {e}? They asked for the {rng.choice(['weekly', 'monthly'])} numbers."


# ---- IBANs -----------------------------------------------------------------

# country: (length, BBAN layout as (count, class) pairs, bank codes for a leading letter group)
IBAN_SPECS = {
    "AD": (24, [(4, "n"), (4, "n"), (12, "c")], None),
    "AT": (20, [(5, "n"), (11, "n")], None),
    "BE": (16, [(3, "n"), (7, "n"), (2, "n")], None),
    "BG": (22, [(4, "a"), (4, "n"), (2, "n"), (8, "c")], ["BNBG", "UNCR", "FINV", "STSA", "RZBB"]),
    "CH": (21, [(5, "n"), (12, "c")], None),
    "CY": (28, [(3, "n"), (5, "n"), (16, "c")], None),
    "CZ": (24, [(4, "n"), (6, "n"), (10, "n")], None),
    "DE": (22, [(8, "n"), (10, "n")], None),
    "DK": (18, [(4, "n"), (9, "n"), (1, "n")], None),
    "EE": (20, [(2, "n"), (2, "n"), (11, "n"), (1, "n")], None),
    "ES": (24, [(4, "n"), (4, "n"), (1, "n"), (1, "n"), (10, "n")], None),
    "FI": (18, [(3, "n"), (11, "n")], None),
    "FR": (27, [(5, "n"), (5, "n"), (11, "c"), (2, "n")], None),
    "GB": (22, [(4, "a"), (6, "n"), (8, "n")], ["NWBK", "BARC", "HBUK", "LOYD", "MIDL", "MONZ", "SRLG", "BUKB"]),
    "GR": (27, [(3, "n"), (4, "n"), (16, "c")], None),
    "HR": (21, [(7, "n"), (10, "n")], None),
    "HU": (28, [(3, "n"), (4, "n"), (1, "n"), (15, "n"), (1, "n")], None),
    "IE": (22, [(4, "a"), (6, "n"), (8, "n")], ["AIBK", "BOFI", "IPBS", "ULSB"]),
    "IS": (26, [(4, "n"), (2, "n"), (6, "n"), (10, "n")], None),
    "IT": (27, [(1, "a"), (5, "n"), (5, "n"), (12, "c")], None),
    "LI": (21, [(5, "n"), (12, "c")], None),
    "LT": (20, [(5, "n"), (11, "n")], None),
    "LU": (20, [(3, "n"), (13, "c")], None),
    "LV": (21, [(4, "a"), (13, "c")], ["HABA", "PARX", "UNLA", "RIKO"]),
    "MC": (27, [(5, "n"), (5, "n"), (11, "c"), (2, "n")], None),
    "MT": (31, [(4, "a"), (5, "n"), (18, "c")], ["MALT", "VALL", "APSB"]),
    "NL": (18, [(4, "a"), (10, "n")], ["ABNA", "INGB", "RABO", "TRIO", "KNAB", "SNSB", "BUNQ"]),
    "NO": (15, [(4, "n"), (6, "n"), (1, "n")], None),
    "PL": (28, [(8, "n"), (16, "n")], None),
    "PT": (25, [(4, "n"), (4, "n"), (11, "n"), (2, "n")], None),
    "RO": (24, [(4, "a"), (16, "c")], ["BTRL", "RNCB", "BRDE", "INGB", "BACX"]),
    "SE": (24, [(3, "n"), (16, "n"), (1, "n")], None),
    "SI": (19, [(5, "n"), (8, "n"), (2, "n")], None),
    "SK": (24, [(4, "n"), (6, "n"), (10, "n")], None),
    "SM": (27, [(1, "a"), (5, "n"), (5, "n"), (12, "c")], None),
    "TR": (26, [(5, "n"), (1, "n"), (16, "c")], None),
    "SA": (24, [(2, "n"), (18, "c")], None),
    "AE": (23, [(3, "n"), (16, "n")], None),
    "IL": (23, [(3, "n"), (3, "n"), (13, "n")], None),
    "BR": (29, [(8, "n"), (5, "n"), (10, "n"), (1, "a"), (1, "c")], None),
    "QA": (29, [(4, "a"), (21, "c")], ["QNBA", "DOHB", "CBQA"]),
    "KW": (30, [(4, "a"), (22, "c")], ["NBOK", "CBKU", "GULB"]),
    "MU": (30, [(4, "a"), (2, "n"), (2, "n"), (12, "n"), (3, "n"), (3, "a")], ["MCBL", "BOMM", "SGBM"]),
    "JO": (30, [(4, "a"), (4, "n"), (18, "c")], ["ARAB", "CBJO", "HBHO"]),
    "GE": (22, [(2, "a"), (16, "n")], ["TB", "BG"]),
    "UA": (29, [(6, "n"), (19, "c")], None),
}
IBAN_WEIGHTS = {"DE": 8, "FR": 6, "GB": 6, "ES": 5, "IT": 5, "NL": 5, "BE": 3, "AT": 3, "CH": 3, "IE": 3, "PT": 3, "PL": 3}
FR_LETTERS = {c: str(v) for v, cs in enumerate(["", "AJ", "BKS", "CLT", "DMU", "ENV", "FOW", "GPX", "HQY", "IRZ"]) for c in cs}


def es_dc(digits):
    w = [1, 2, 4, 8, 5, 10, 9, 7, 3, 6]
    c = 11 - sum(int(d) * w[i] for i, d in enumerate(digits)) % 11
    return {11: 0, 10: 1}.get(c, c)


def gen_iban_parts(rng, cc):
    length, layout, banks = IBAN_SPECS[cc]
    parts = []
    for i, (n, cls) in enumerate(layout):
        if cls == "a":
            parts.append(rng.choice(banks) if (i == 0 and banks and len(banks[0]) == n) else rstr(rng, n, UPPER))
        elif cls == "n":
            parts.append(rstr(rng, n, DIGITS))
        else:
            parts.append(rstr(rng, n, UPPER + DIGITS) if rng.random() < 0.15 else rstr(rng, n, DIGITS))
    if cc == "BE":
        c = int(parts[0] + parts[1]) % 97
        parts[2] = f"{c or 97:02d}"
    elif cc in ("FR", "MC"):
        acct = "".join(FR_LETTERS.get(ch, ch) for ch in parts[2])
        parts[3] = f"{97 - (89 * int(parts[0]) + 15 * int(parts[1]) + 3 * int(acct)) % 97:02d}"
    elif cc == "ES":
        parts[2] = str(es_dc("00" + parts[0] + parts[1]))
        parts[3] = str(es_dc(parts[4]))
    bban = "".join(parts)
    assert len(bban) + 4 == length, cc
    num = "".join(str(int(ch, 36)) for ch in bban + cc + "00")
    check = 98 - int(num) % 97
    return f"{cc}{check:02d}{bban}"


def gen_iban(rng):
    ccs = list(IBAN_SPECS)
    cc = weighted(rng, [(c, IBAN_WEIGHTS.get(c, 1.5)) for c in ccs])
    iban = gen_iban_parts(rng, cc)
    assert iban_ok(iban)
    return group(iban, [4] * 9) if rng.random() < 0.5 else iban


BICS = ["COBADEFFXXX", "DEUTDEFF", "BNPAFRPP", "NWBKGB2L", "INGBNL2A", "BBVAESMM", "UNCRITMM", "GEBABEBB",
        "RZOOAT2L", "UBSWCHZH80A", "AIBKIE2D", "BCOMPTPL", "PKOPPLPW", "SWEDSESS", "DABADKKK", "NDEAFIHH"]


def ctx_iban(rng, iban):
    amount = f"{rng.randint(40, 48000)}.{rng.randint(0, 99):02d}"
    amount_eu = amount.replace(".", ",")
    inv = f"{rng.choice(['INV', 'RE', 'FAC', 'F'])}-{rng.randint(2022, 2025)}-{rng.randint(100, 9999):04d}"
    name = rng.choice(COMPANIES + [person(rng) for _ in range(3)])
    t = rng.randrange(14)
    if t == 0:
        return f"Please transfer EUR {amount} to IBAN {iban} (BIC {rng.choice(BICS)}) quoting invoice {inv} within 14 days."
    if t == 1:
        return f"Bankverbindung:\nKontoinhaber: {name}\nIBAN: {iban}\nBIC: {rng.choice(BICS)}\nVerwendungszweck: {inv}"
    if t == 2:
        return f"Merci de régler la facture {inv} ({amount_eu} EUR) par virement sur le compte {iban}."
    if t == 3:
        return json.dumps({"payout": {"beneficiary": name, "iban": iban, "currency": "EUR", "amount": float(amount), "reference": inv}}, indent=2)
    if t == 4:
        return f"beneficiary,iban,amount,currency,reference\n\"{name}\",{iban},{amount},EUR,{inv}"
    if t == 5:
        return f"<CdtrAcct>\n  <Id>\n    <IBAN>{iban.replace(' ', '')}</IBAN>\n  </Id>\n</CdtrAcct>\n<RmtInf><Ustrd>{inv}</Ustrd></RmtInf>", iban.replace(" ", "")
    if t == 6:
        return f"Hi! Can you refund me to my account instead of the card? My IBAN is {iban}. Thanks, {rng.choice(FIRST)}"
    if t == 7:
        return f"Le pedimos que realice la transferencia a la cuenta {iban} indicando el número de factura {inv}."
    if t == 8:
        return f"Gelieve het bedrag van € {amount_eu} over te maken op rekeningnummer {iban} t.n.v. {name}."
    if t == 9:
        return f"{iso_ts(rng)} INFO payouts: created transfer amount={amount} currency=EUR destination_iban={iban} status=pending"
    if t == 10:
        return f"Vendor onboarding form\nLegal name: {name}\nPayment terms: Net 30\nBank account (IBAN): {iban}\nCurrency: EUR"
    if t == 11:
        return f"Si prega di effettuare il bonifico sull'IBAN {iban} intestato a {name}, causale {inv}."
    if t == 12:
        return f"Why does our validator reject {iban}? The customer swears it's correct and the bank accepted it."
    return f"UPDATE vendors SET iban = '{iban}', updated_at = now() WHERE vendor_code = '{rng.choice(WORDS).upper()}{rng.randint(10, 99)}';"


# ---- payment cards ---------------------------------------------------------


def gen_card(rng):
    net = weighted(rng, [("visa", 30), ("mc", 18), ("mc2", 7), ("amex", 10), ("discover", 8), ("jcb", 6),
                         ("diners", 5), ("unionpay", 6), ("maestro", 5), ("visa13", 2), ("visa19", 3)])
    if net == "visa":
        prefix, n = "4", 16
    elif net == "visa13":
        prefix, n = "4", 13
    elif net == "visa19":
        prefix, n = "4", 19
    elif net == "mc":
        prefix, n = str(rng.randint(51, 55)), 16
    elif net == "mc2":
        prefix, n = str(rng.randint(2221, 2720)), 16
    elif net == "amex":
        prefix, n = rng.choice(["34", "37"]), 15
    elif net == "discover":
        prefix, n = rng.choice(["6011", "6011", str(rng.randint(644, 649)), "65"]), rng.choice([16, 16, 16, 19])
    elif net == "jcb":
        prefix, n = str(rng.randint(3528, 3589)), 16
    elif net == "diners":
        prefix, n = rng.choice(["36", "38", str(rng.randint(300, 305))]), 14
    elif net == "unionpay":
        prefix, n = "62" + rng.choice(["2", "4", "5", "8"]), rng.choice([16, 16, 17, 18, 19])
    else:
        prefix, n = rng.choice(["5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763"]), rng.choice([16, 18, 19])
    while True:
        num = luhn_complete(prefix + rstr(rng, n - len(prefix) - 1, DIGITS))
        if num not in TEST_CARDS and len(set(num)) > 3:
            break
    style = rng.choice(["compact", "space", "space", "dash"])
    if style == "compact":
        return num
    sep = " " if style == "space" else "-"
    if n == 15:
        return group(num, [4, 6, 5], sep)
    if n == 14:
        return group(num, [4, 6, 4], sep)
    if n == 13:
        return num if rng.random() < 0.5 else group(num, [4, 4, 5], sep)
    return group(num, [4, 4, 4, 4, 4], sep)


def ctx_card(rng, card):
    exp = f"{rng.randint(1, 12):02d}/{rng.randint(25, 31)}"
    name = person(rng)
    order = f"#{rng.randint(10000, 99999)}"
    t = rng.randrange(15)
    if t == 0:
        return f"Hi, I was charged twice for order {order}. The card I used is {card}, exp {exp}. Can you refund one of them?"
    if t == 1:
        return json.dumps({"payment_method": {"type": "card", "number": card, "exp": exp, "holder": name}, "amount": rng.randint(500, 90000), "currency": rng.choice(["usd", "eur", "gbp"])}, indent=2)
    if t == 2:
        return f"{iso_ts(rng)} ERROR checkout: gateway declined card_number={card} reason=insufficient_funds attempt={rng.randint(1, 3)}"
    if t == 3:
        return f"Please update the card on file for our account to {card} (expires {exp}). The old one was cancelled."
    if t == 4:
        return f"order_id,amount,card_number,status\n{rng.randint(10000, 99999)},{rng.randint(5, 900)}.{rng.randint(0, 99):02d},{card},captured"
    if t == 5:
        return f"User: my card {card} keeps getting rejected at checkout, what should I do?\nAssistant: Sorry about that! Let me check."
    if t == 6:
        return f"POST /api/v1/payments\nContent-Type: application/x-www-form-urlencoded\n\ncc_number={card.replace(' ', '+')}&cc_exp={exp.replace('/', '%2F')}&amount={rng.randint(5, 500)}.00", card.replace(" ", "+")
    if t == 7:
        return f"Cardholder: {name}\nCard number: {card}\nExpiry: {exp}\nBilling ZIP on file"
    if t == 8:
        return f"Can you pay the hotel deposit with the company card? Number is {card}, expiry {exp}; I'll send the security code separately."
    if t == 9:
        return f"INSERT INTO payments (order_ref, pan, exp) VALUES ('{order}', '{card}', '{exp}');"
    if t == 10:
        return f"Ticket {order}: customer says the refund to {card} never arrived (original charge on {date_only(rng)})."
    if t == 11:
        return f"Tarjeta: {card}\nCaducidad: {exp}\nTitular: {name}"
    if t == 12:
        return f"payment:\n  card: \"{card}\"\n  expiry: \"{exp}\"\n  save_for_later: true"
    if t == 13:
        return f"Why does Luhn validation fail in our form for {card}? It's a real card from my bank."
    return f"Kreditkarte: {card} (gültig bis {exp}) – bitte für die Buchung {order} belasten."


# ---- US social security numbers --------------------------------------------


def gen_ssn_digits(rng):
    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        s = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
        if s not in ("078051120", "219099999", "123456789") and ssn_ok(s):
            return s


def gen_ssn(rng):
    s = gen_ssn_digits(rng)
    form = weighted(rng, [("dash", 60), ("space", 20), ("compact", 20)])
    v = {"dash": f"{s[:3]}-{s[3:5]}-{s[5:]}", "space": f"{s[:3]} {s[3:5]} {s[5:]}", "compact": s}[form]
    return {"value": v, "form": form}


SSN_WORDS = ["SSN", "SSN:", "SSN#", "SS#", "Social Security Number:", "social security number", "social security no.",
             "Soc. Sec. #", "taxpayer id", "Taxpayer ID (SSN):", "SSN/TIN:", "ssn="]


def ctx_ssn(rng, item):
    v = item["value"]
    name = person(rng)
    w = rng.choice(SSN_WORDS)
    if item["form"] != "dash":
        t = rng.randrange(8)
        if t == 0:
            return f"Employee onboarding: {name}, start date {date_only(rng)}, {w} {v}, department {rng.choice(['Finance', 'Sales', 'Ops'])}."
        if t == 1:
            return f"Hi, for the W-9 you asked for, my {w} {v}. Let me know if you need anything else."
        if t == 2:
            return f"applicant:\n  name: {name}\n  {rng.choice(['ssn', 'social_security_number', 'tax_id_ssn'])}: \"{v}\"\n  state: {rng.choice(['CA', 'TX', 'NY', 'WA', 'IL'])}"
        if t == 3:
            return f"{iso_ts(rng)} DEBUG kyc.verify applicant={uuid4(rng)} ssn={v} result=manual_review"
        if t == 4:
            return f"Please correct the {w} on my 1099 to {v}; the one on the form has two digits swapped."
        if t == 5:
            return f"Name: {name}\n{w} {v}\nFiling status: {rng.choice(['single', 'married filing jointly', 'head of household'])}"
        if t == 6:
            return json.dumps({"first_name": name.split()[0], "last_name": name.split()[1], "ssn": v, "income_verified": False}, indent=2)
        return f"Verify identity: {w} {v} matches the credit bureau file? ({rng.choice(['Experian', 'Equifax', 'TransUnion'])} pull pending)"
    t = rng.randrange(12)
    if t == 0:
        return f"Employee: {name}\nSSN: {v}\nStart date: {date_only(rng)}\nDepartment: {rng.choice(['Engineering', 'Finance', 'Support'])}"
    if t == 1:
        return f"My social security number is {v}, can you check why my application was denied?"
    if t == 2:
        return f"employee_id,name,ssn,state\nE{rng.randint(1000, 9999)},{name},{v},{rng.choice(['CA', 'TX', 'NY', 'FL', 'OH'])}"
    if t == 3:
        return json.dumps({"applicant": {"name": name, "ssn": v, "annual_income": rng.randint(30, 250) * 1000}}, indent=2)
    if t == 4:
        return f"{iso_ts(rng)} WARN payroll-sync: duplicate record for {v} in batch {rng.randint(100, 999)}, skipping"
    if t == 5:
        return f"Form W-2, box a (employee's social security number): {v}"
    if t == 6:
        return f"The background check for {name} came back clear. SSN on file {v}, no aliases."
    if t == 7:
        return f"INSERT INTO tax_profiles (user_id, ssn, filing_status) VALUES ({rng.randint(1, 99999)}, '{v}', 'single');"
    if t == 8:
        return f"Hi HR, I noticed my pay stub shows the wrong SSN ({v}). Could you fix it before the next run?"
    if t == 9:
        return f"patient:\n  name: {name}\n  ssn: {v}\n  insurance: {rng.choice(['Aetna', 'Cigna', 'Kaiser'])}"
    if t == 10:
        return f"Co-signer {name}, {v}, has agreed to the lease terms."
    return f"Verification code sent. For security, confirm your identity: {v} ({name})."


# ---- phone numbers ---------------------------------------------------------


def expand(rng, pattern):
    """Digits from a small pattern language: X any digit, N 2-9, M 1-9, {a|b|c} one of the alternatives."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "{":
            depth, j = 1, i + 1
            alts, start = [], i + 1
            while depth:
                if pattern[j] == "{":
                    depth += 1
                elif pattern[j] == "}":
                    depth -= 1
                    if depth == 0:
                        alts.append(pattern[start:j])
                elif pattern[j] == "|" and depth == 1:
                    alts.append(pattern[start:j])
                    start = j + 1
                j += 1
            out.append(expand(rng, rng.choice(alts)))
            i = j
            continue
        out.append({"X": lambda: rng.choice(DIGITS), "N": lambda: rng.choice("23456789"), "M": lambda: rng.choice("123456789")}.get(ch, lambda: ch)())
        i += 1
    return "".join(out)


def shape(digits, fmt):
    it = iter(digits)
    out = "".join(next(it) if c == "#" else c for c in fmt)
    assert next(it, None) is None, (digits, fmt)
    return out


US_AREAS = "{201|202|206|212|213|303|305|310|312|313|347|404|410|415|469|503|512|602|617|646|702|713|718|720|773|801|808|818|858|917|919|971}"
CA_AREAS = "{416|604|514|403|613|780|902|905|647|778|587|438}"
US_INTL = ["+1 ### ### ####", "+1 (###) ###-####", "+1-###-###-####", "+1 ###-###-####", "+1##########", "+1.###.###.####"]
US_NAT = ["(###) ###-####", "###-###-####", "###.###.####", "1-###-###-####", "(###)###-####", "1 (###) ###-####"]

# (region, country code, national-number pattern, international shapes, national shapes)
PHONE_PLANS = [
    ("US", "1", US_AREAS + "NXXXXXX", US_INTL, US_NAT),
    ("CA", "1", CA_AREAS + "NXXXXXX", US_INTL, US_NAT),
    ("GB", "44", "20{7|8|3}XXXXXXX", ["+44 ## #### ####", "+44 (0)## #### ####", "+44##########"], ["0## #### ####", "(0##) #### ####", "0##-####-####"]),
    ("GB", "44", "{161|121|131|141|113}{2|4|5}XXXXXX", ["+44 ### ### ####", "+44 (0)### ### ####"], ["0### ### ####", "(0###) ### ####"]),
    ("GB", "44", "7{4X|5X|8X|7{1|2|3|4|5|6|8|9}}XXXXXXX", ["+44 #### ######", "+44 (0)#### ######", "+44 ### ### ####", "+44##########"], ["0#### ######", "0#### ### ###"]),
    ("DE", "49", "30{2|3|4|6|8}XXXXXXX", ["+49 ## ########", "+49 (0)## ########", "+49 ## #### ####", "+49-##-########"], ["0## ########", "0##/########", "(0##) ########", "0## #### ####"]),
    ("DE", "49", "{89|40|69}{2|3|5|6|7}XXXXXX", ["+49 ## #######", "+49 (0)## #######"], ["0## #######", "0##/#######", "(0##) #######"]),
    ("DE", "49", "{151|152|157|159}XXXXXXXX", ["+49 ### ########", "+49 (0)### ########", "+49 ###########"], ["0### ########", "0###/########", "0### #### ####"]),
    ("DE", "49", "{170|171|172|173|174|175|176|178|179}XXXXXXX", ["+49 ### #######", "+49 ### ### ####"], ["0### #######", "0###/#######", "0### ### ####"]),
    ("FR", "33", "{1{4|5|4}|2{3|4}|3{2|8}|4{7|9}|5{5|6}}XXXXXXX", ["+33 # ## ## ## ##", "+33 (0)# ## ## ## ##", "+33#########", "+33 #########"], ["0# ## ## ## ##", "0#.##.##.##.##", "0#-##-##-##-##", "0#########"]),
    ("FR", "33", "{6{0|1|2|4|5|6|7|8}|7{5|6|7|8}}XXXXXXX", ["+33 # ## ## ## ##", "+33 (0)# ## ## ## ##", "+33#########"], ["0# ## ## ## ##", "0#.##.##.##.##", "0#########"]),
    ("IN", "91", "{6|7|8|9}XXXXXXXXX", ["+91 ##### #####", "+91-##########", "+91 ##########", "+91 ### ### ####"], ["0##### #####", "##### #####", "0##########"]),
    ("IN", "91", "{11|22}{2|4|6}XXXXXXX", ["+91 ## #### ####", "+91-##-########"], ["0##-########", "0## #### ####", "(0##) ########"]),
    ("BR", "55", "{11|21|31|41|51|61|71|81}9XXXXXXXX", ["+55 ## #####-####", "+55 (##) #####-####", "+55 ###########"], ["(##) #####-####", "(##) # ####-####", "0## #####-####"]),
    ("BR", "55", "{11|21|31}{2|3|4}XXXXXXX", ["+55 ## ####-####", "+55 (##) ####-####"], ["(##) ####-####", "0## ####-####"]),
    ("AU", "61", "4{0|1|2|3}{0|1|2|3|4|5|6|7|8}XXXXXX", ["+61 ### ### ###", "+61 #########", "+61 (0)### ### ###"], ["0### ### ###", "0#########", "0### ######"]),
    ("AU", "61", "{2|3}{8|9}XXXXXXX", ["+61 # #### ####", "+61 (0)# #### ####"], ["(0#) #### ####", "0# #### ####", "0#-####-####"]),
    ("JP", "81", "{3|6}{2|3|4|5|6|7|8|9}XXXXXXX", ["+81 #-####-####", "+81 # #### ####", "+81-#-####-####"], ["0#-####-####", "(0#) ####-####", "0# #### ####"]),
    ("JP", "81", "{70|80|90}{1|2|3|4|5|6|7|8|9}XXXXXXX", ["+81 ##-####-####", "+81 ## #### ####", "+81##########"], ["0##-####-####", "0## #### ####", "0##########"]),
    ("ES", "34", "{6X|7{1|2|3|4}}XXXXXXX", ["+34 ### ### ###", "+34 ### ## ## ##", "+34#########"], None),
    ("ES", "34", "{91|93}{1|2|3|4|5|6|7|8}XXXXXX", ["+34 ## ### ## ##", "+34 ### ### ###"], None),
    ("IT", "39", "3{2|3|4|5|6|8|9}XXXXXXXX", ["+39 ### ### ####", "+39 ### #######", "+39 ##########"], None),
    ("IT", "39", "0{2|6}{3|4|5|6|7|8}XXXXXXX", ["+39 ## #### ####", "+39 ## ########"], None),
    ("NL", "31", "6{1|2|3|4|5}XXXXXXX", ["+31 # ########", "+31 # #### ####", "+31 (0)# ########"], None),
    ("NL", "31", "20{5|6|7}XXXXXX", ["+31 ## ### ####", "+31 (0)## ### ####"], None),
    ("BE", "32", "4{7|8|9}XXXXXXX", ["+32 ### ## ## ##", "+32 ### ######"], None),
    ("BE", "32", "2{2|5|6|7}XXXXXX", ["+32 # ### ## ##"], None),
    ("CH", "41", "7{6|7|8|9}XXXXXXX", ["+41 ## ### ## ##", "+41 #########"], None),
    ("CH", "41", "{44|22|31}{2|3|4|5}XXXXXX", ["+41 ## ### ## ##"], None),
    ("AT", "43", "{650|660|664|676|680|681|688|699}XXXXXXX", ["+43 ### #######", "+43 ### ### ####"], None),
    ("AT", "43", "1{2|3|4|5|7}XXXXXX", ["+43 # #######", "+43 # ### ####"], None),
    ("SE", "46", "7{0|2|3|6}XXXXXXX", ["+46 ## ### ## ##", "+46 #########"], None),
    ("SE", "46", "8{5|6|7}XXXXXXX", ["+46 # ### ### ##", "+46 # ## ## ## ##"], None),
    ("NO", "47", "{4{0|1|5|6|7|8}|9{0|1|2|3|4|5|7|8}}XXXXXX", ["+47 ### ## ###", "+47 ## ## ## ##", "+47 ########"], None),
    ("DK", "45", "{2X|3{0|1}|4{0|1|2}}{1|2|3|4|5}XXXXX", ["+45 ## ## ## ##", "+45 ########", "+45 #### ####"], None),
    ("FI", "358", "{4{0|1|2|4|5|6}|50}XXXXXXX", ["+358 ## ### ####", "+358 ## #######"], None),
    ("PL", "48", "{5{0|1|3}|6{0|6|9}|7{2|8|9}|88}XXXXXXX", ["+48 ### ### ###", "+48 #########"], None),
    ("PL", "48", "22{3|4|5|6|8}XXXXXX", ["+48 ## ### ## ##"], None),
    ("PT", "351", "9{1|2|3|6}XXXXXXX", ["+351 ### ### ###", "+351 #########"], None),
    ("PT", "351", "21{3|4|7|8}XXXXXX", ["+351 ## ### ####"], None),
    ("IE", "353", "8{3|5|6|7|9}XXXXXXX", ["+353 ## ### ####", "+353 (0)## ### ####"], None),
    ("IE", "353", "1{2|4|6|8}XXXXXX", ["+353 # ### ####"], None),
    ("GR", "30", "69{0|3|4|5|7|8|9}XXXXXXX", ["+30 ### ### ####", "+30 ##########"], None),
    ("GR", "30", "21{0|1|2|3}XXXXXXX", ["+30 ### ### ####"], None),
    ("CZ", "420", "{60{1|2|3|4|5|6|7|8}|7{2|3|7|9}X}XXXXXX", ["+420 ### ### ###", "+420#########"], None),
    ("HU", "36", "{20|30|70}XXXXXXX", ["+36 ## ### ####", "+36-##-###-####"], None),
    ("HU", "36", "1{2|3|4}XXXXXX", ["+36 # ### ####"], None),
    ("RO", "40", "7{2|3|4|5|6|7}XXXXXXX", ["+40 ### ### ###", "+40 #########"], None),
    ("TR", "90", "{5{3|4}{0|1|2|3|4|5}|55{1|2|3|4|5}}XXXXXXX", ["+90 ### ### ## ##", "+90 ### ### ####", "+90##########"], None),
    ("MX", "52", "{55|33|81}{1|2|3|4|5|6|7|8|9}XXXXXXX", ["+52 ## #### ####", "+52 ## ########"], None),
    ("AR", "54", "911{2|3|4|5|6}XXXXXXX", ["+54 # ## ####-####", "+54 # ## #### ####"], None),
    ("CL", "56", "9{2|4|5|8}XXXXXXX", ["+56 # #### ####", "+56 #########"], None),
    ("CO", "57", "{3{0|1}{0|1|2|3|4|5}|32{0|1|2|3}}XXXXXXX", ["+57 ### ### ####", "+57 ### #######"], None),
    ("PE", "51", "9XXXXXXXX", ["+51 ### ### ###"], None),
    ("NZ", "64", "2{1|2|7}XXXXXXX", ["+64 ## ### ####", "+64 ## #######"], None),
    ("NZ", "64", "9{3|4|5|6|8}XXXXXX", ["+64 # ### ####"], None),
    ("KR", "82", "10{2|3|4|6|7|8|9}XXXXXXX", ["+82 ##-####-####", "+82 ## #### ####"], None),
    ("KR", "82", "2{2|3|4|5|6|7|8|9}XXXXXXX", ["+82 #-####-####"], None),
    ("CN", "86", "1{3X|5{0|1|2|3|5|6|7|8|9}|8X|7{6|7|8}|9{8|9}}XXXXXXXX", ["+86 ### #### ####", "+86 ###########", "+86-###-####-####"], None),
    ("CN", "86", "10{5|6}XXXXXXX", ["+86 ## #### ####"], None),
    ("SG", "65", "{8|9}{1|2|3|4|5|6|7|8}XXXXXX", ["+65 #### ####", "+65 ########", "+65-####-####"], None),
    ("HK", "852", "{6{1|2|3|4|5}|9{2|3|4|5|7}}{1|2|3|4|5}XXXXX", ["+852 #### ####", "+852-####-####"], None),
    ("TW", "886", "9{1|2|3|5|6|7|8}XXXXXXX", ["+886 ### ### ###", "+886 #########", "+886-###-######"], None),
    ("ZA", "27", "{6{0|1|2|3|4|5|6|7|8}|7{1|2|3|4|6|8|9}|8{1|2|3|4}}XXXXXXX", ["+27 ## ### ####", "+27 #########"], None),
    ("NG", "234", "{80{3|5|6|7|8|9}|70{3|5|6|8|9}|81{0|2|3|4|6|8}}XXXXXXX", ["+234 ### ### ####", "+234 ##########"], None),
    ("KE", "254", "7{0|1|2|9}XXXXXXX", ["+254 ### ######", "+254 ### ### ###"], None),
    ("EG", "20", "1{0|1|2|5}XXXXXXXX", ["+20 ## #### ####", "+20 ##########"], None),
    ("AE", "971", "5{0|2|4|5|6|8}XXXXXXX", ["+971 ## ### ####", "+971 #########", "+971-##-###-####"], None),
    ("SA", "966", "5{0|3|4|5|6|9}XXXXXXX", ["+966 ## ### ####", "+966 #########"], None),
    ("IL", "972", "5{0|2|4}{2|3|4|5|6|7}XXXXXX", ["+972 ##-###-####", "+972 ## ### ####"], None),
    ("PH", "63", "9{0|1|2|5|7|8}{5|6|7|8|9}XXXXXXX", ["+63 ### ### ####", "+63 ##########"], None),
    ("ID", "62", "8{1|2|5}{1|2|3}XXXXXXXX", ["+62 ###-####-####", "+62 ### #### ####"], None),
    ("TH", "66", "{8|9}{1|2|3|4|5|6|7|8|9}XXXXXXX", ["+66 ## ### ####", "+66 #########"], None),
    ("VN", "84", "9{0|1|3|4|6|7|8}XXXXXXX", ["+84 ## ### ## ##", "+84 ### ### ###"], None),
    ("MY", "60", "{1{2|6|9}X|1{3|7}{2|3|4|6|8|9}}XXXXXX", ["+60 ##-### ####", "+60 ## ### ####"], None),
    ("PK", "92", "3{0|1|2|3|4}{0|1|2|3|4|5}XXXXXXX", ["+92 ### #######", "+92 ###-#######"], None),
    ("RU", "7", "9{0|1|2|5|6|8}{0|1|2|3|5|6|7}XXXXXXX", ["+7 ### ###-##-##", "+7 (###) ###-##-##", "+7 ### ### ## ##"], None),
    ("RU", "7", "495{2|3|4|5|6|7|9}XXXXXX", ["+7 (###) ###-##-##", "+7 ### ###-##-##"], None),
    ("UA", "380", "{50|63|66|67|68|73|93|95|96|97|98|99}XXXXXXX", ["+380 ## ### ####", "+380 (##) ### ## ##"], None),
]
DOUBLE_ZERO = {"GB", "DE", "FR", "ES", "IT", "NL", "BE", "CH", "AT", "SE", "DK", "PL", "PT", "IE", "CZ", "HU", "RO", "TR", "IN", "ZA", "NZ", "EG", "AE", "SA", "MX"}
NAT_WORDS = {
    "US": ["Phone:", "Call", "call me at", "Cell:", "cell", "Tel:", "Mobile:", "reach me at", "text me at", "Fax:", "phone number"],
    "CA": ["Phone:", "Call", "cell", "Tel.", "reach me at", "Mobile:"],
    "GB": ["Tel:", "Mob:", "Mobile:", "call me on", "phone", "ring me on", "Tel."],
    "DE": ["Tel.:", "Telefon:", "Mobil:", "Handy:", "Fax:", "Tel."],
    "FR": ["Tél. :", "Téléphone :", "Portable :", "appelez le", "tél.", "Tel."],
    "IN": ["Mobile:", "Ph:", "call", "WhatsApp", "Mob."],
    "BR": ["Telefone:", "Celular:", "WhatsApp:", "ligue para", "Tel."],
    "AU": ["Ph:", "Mob:", "Phone:", "call", "mobile"],
    "JP": ["電話:", "TEL:", "携帯:", "Tel", "電話番号："],
}
CITIES = {"US": ["Springfield", "Austin", "Denver", "Seattle"], "CA": ["Toronto", "Vancouver", "Montréal"], "GB": ["Leeds", "London", "Manchester"],
          "DE": ["Köln", "Berlin", "München"], "FR": ["Lyon", "Paris", "Nantes"], "IN": ["Pune", "Delhi", "Mumbai"],
          "BR": ["Campinas", "São Paulo", "Recife"], "AU": ["Perth", "Sydney", "Melbourne"], "JP": ["Osaka", "Tokyo", "Kyoto"]}
PHONE_WORD_RE = re.compile(r"(?i)(phone|tel|mobile|mob|cell|call|fax|whatsapp|reach me at|text me|ring me|telefon|téléphone|tél|portable|appelez|número|telefone|celular|ligue|handy|mobil|ph:|電話|携帯)")


def phone_valid(value, region, national):
    if phonenumbers is None:
        return True
    s = "+" + value[2:] if value.startswith("00") else value
    try:
        n = phonenumbers.parse(s, region if national else None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(n)


def gen_phone(rng):
    while True:
        national = rng.random() < 0.4
        region, cc, pattern, intl, nat = rng.choice([p for p in PHONE_PLANS if p[4]] if national else PHONE_PLANS)
        nsn = expand(rng, pattern)
        if cc == "1" and (nsn[3:6] == "555" or nsn[4:6] == "11"):
            continue
        if cc == "44" and nsn.startswith("7700900"):
            continue
        if national:
            v = shape(nsn, rng.choice(nat))
        else:
            v = shape(nsn, rng.choice(intl))
            if region in DOUBLE_ZERO and rng.random() < 0.25 and "(0)" not in v and " " in v:
                v = "00" + v[1:]
        return {"value": v, "region": region, "national": national}


def ctx_phone(rng, item):
    v, region, national = item["value"], item["region"], item["national"]
    name = person(rng)
    if national:
        w = rng.choice(NAT_WORDS[region])
        t = rng.randrange(9)
        if t == 0:
            return f"Thanks for your order! If anything is wrong with the delivery, {w} {v} between 9 and 5."
        if t == 1:
            return f"{name}\n{rng.choice(['Office Manager', 'Site Lead', 'Sales', 'Owner'])}, {rng.choice(COMPANIES)}\n{w} {v}"
        if t == 2:
            return f"Hi, it's {name.split()[0]} from the {rng.choice(['clinic', 'garage', 'school office', 'front desk'])}. Please call me back on {v} when you get this message."
        if t == 3:
            return json.dumps({"customer": name, "phone": v, "preferred_contact": "phone", "notes": "leave a voicemail"}, ensure_ascii=False, indent=2)
        if t == 4:
            return f"Contact\n{rng.choice(COMPANIES)}\n{w} {v}\nOpening hours Mon-Fri 8-17"
        if t == 5:
            return f"name,phone,city\n{name},{v},{rng.choice(CITIES[region])}"
        if t == 6:
            return f"Support ticket: customer asked for a callback. {w} {v}, best after 6pm."
        if t == 7:
            return f"- {name} ({rng.choice(['landlord', 'plumber', 'accountant', 'vet'])}) — {w} {v}"
        return f"Für Rückfragen erreichen Sie uns unter {w} {v}." if region == "DE" else f"For questions about invoice {rng.randint(1000, 9999)}, {w} {v}."
    t = rng.randrange(13)
    if t == 0:
        return f"Call me on {v} when you land, I'll be waiting outside arrivals."
    if t == 1:
        return f"WhatsApp: {v}\n{name} — {rng.choice(['Berlin', 'Madrid', 'Lagos', 'Singapore', 'Toronto', 'Dubai', 'Sydney', 'Seoul'])}"
    if t == 2:
        return json.dumps({"id": rng.randint(1000, 99999), "name": name, "phone": v, "country": region}, indent=2)
    if t == 3:
        return f"BEGIN:VCARD\nVERSION:3.0\nFN:{name}\nTEL;TYPE=CELL:{v}\nEND:VCARD"
    if t == 4:
        return f"<a href=\"tel:{v.replace(' ', '')}\">Call our front desk</a>", v.replace(" ", "")
    if t == 5:
        return f"{iso_ts(rng)} INFO sms-gateway: delivered otp to={v} provider={rng.choice(['twilio', 'vonage', 'sinch'])} latency_ms={rng.randint(80, 900)}"
    if t == 6:
        return f"message = client.messages.create(to=\"{v}\", from_=TWILIO_NUMBER, body=\"Your table is ready\")"
    if t == 7:
        return f"Reservation for {rng.randint(2, 8)} at {rng.randint(6, 9)}pm under {name.split()[1]}, {v}"
    if t == 8:
        return f"{name}\n{rng.choice(COMPANIES)}\nT {v}"
    if t == 9:
        return f"contact_name,contact_phone\n{name},{v}"
    if t == 10:
        return f"Pickup driver: {name.split()[0]}, {v}. He'll text when he's 10 minutes out."
    if t == 11:
        return f"The customer's number {v} fails our E.164 validation even though it works. Why?"
    return f"emergency_contact:\n  name: {name}\n  phone: \"{v}\""


# --------------------------------------------------------------------------
# Positives: the driver
# --------------------------------------------------------------------------

POSITIVE_KINDS = [
    ("pem_private_key", gen_pem, ctx_pem, 340),
    ("jwt", gen_jwt, ctx_jwt, 340),
    ("openai_key", gen_openai, ctx_openai, 340),
    ("aws_access_key", gen_aws, ctx_aws, 340),
    ("github_token", gen_github, ctx_github, 340),
    ("slack_token", gen_slack, ctx_slack, 340),
    ("email", gen_email, ctx_email, 360),
    ("iban", gen_iban, ctx_iban, 350),
    ("payment_card", gen_card, ctx_card, 360),
    ("us_ssn", gen_ssn, ctx_ssn, 340),
    ("phone", gen_phone, ctx_phone, 450),
]


def positive_problems(kind, value, text, item):
    problems = []
    if text.count(value) != 1:
        problems.append("value not exactly once")
        return problems
    start = text.index(value)
    end = start + len(value)
    for k, s, e in guard_scan(text):
        if e <= start or s >= end:
            problems.append(f"other finding: {k} {text[s:e]!r}")
    rest = text[:start] + "\n" + text[end:]
    for name, pattern in STRICT_NEGATIVE:
        if pattern.search(rest):
            problems.append(f"other {name}")
    if "PRIVATE KEY" in rest:
        problems.append("other key")
    for m in GUARD_PATTERNS[9][1].finditer(rest):
        if ssn_ok(m.group(0)):
            problems.append("other ssn")
    if kind == "phone":
        if item["national"]:
            before = text[max(0, start - 40) : start]
            if not PHONE_WORD_RE.search(before):
                problems.append("national phone without a context word")
        if not phone_valid(item["value"], item["region"], item["national"]):
            problems.append("phonenumbers: invalid")
    if kind == "payment_card":
        d = re.sub(r"\D", "", value)
        assert luhn_ok(d) and d not in TEST_CARDS and looks_like_card(d), value
    if kind == "iban":
        assert iban_ok(value), value
    if kind == "us_ssn":
        assert ssn_ok(value), value
        if item["form"] != "dash":
            before = text[max(0, start - 40) : start].lower()
            if not re.search(r"ssn|ss#|social[ _]security|soc\. sec|taxpayer|tin", before):
                problems.append("ssn without a context word")
    if kind == "aws_access_key":
        assert not value.endswith("EXAMPLE")
    return problems


def build_positives(report):
    rows = []
    for kind, gen, ctx, n in POSITIVE_KINDS:
        rng = stream("positive/" + kind)
        values, texts = set(), set()
        rejected = Counter()
        kept = 0
        while kept < n:
            item = gen(rng)
            raw = item["value"] if isinstance(item, dict) else item
            if raw in values:
                continue
            out = ctx(rng, item if isinstance(item, dict) else raw)
            text, value = out if isinstance(out, tuple) else (out, raw)
            problems = positive_problems(kind, value, text, item if isinstance(item, dict) else None)
            if problems or text in texts:
                for p in problems or ["duplicate text"]:
                    rejected[p.split(":")[0]] += 1
                if sum(rejected.values()) > 20 * n:
                    raise SystemExit(f"{kind}: too many rejected candidates: {rejected.most_common(5)}")
                continue
            values.add(raw)
            texts.add(text)
            rows.append({"kind": kind, "value": value, "text": text})
            kept += 1
        report[kind] = rejected
    return rows


# --------------------------------------------------------------------------
# Negatives: one generator per category
# --------------------------------------------------------------------------


def jdump(rng, obj):
    """Pretty JSON when it stays within ~15 lines, else one line."""
    s = json.dumps(obj, indent=rng.choice([2, 2, 4, None]))
    return s if s.count("\n") < 16 else json.dumps(obj)


def src_path(rng, ext):
    return f"{rng.choice(['src', 'app', 'lib', 'internal', 'pkg', 'services'])}/{rng.choice(NOUNS)}/{ident(rng)}.{ext}"


def neg_code_rust(rng):
    T, f, n = type_name(rng), ident(rng), rng.choice(NOUNS)
    t = rng.randrange(9)
    if t == 0:
        return fill("""#[derive(Debug, Clone, PartialEq, Eq)]
pub struct <<T>> {
    pub id: u64,
    pub name: String,
    pub retries: u32,
}

impl <<T>> {
    pub fn new(id: u64, name: impl Into<String>) -> Self {
        Self { id, name: name.into(), retries: <<r>> }
    }

    pub fn <<f>>(&self) -> Option<&str> {
        self.name.split('/').nth(<<k>>)
    }
}""", T=T, f=f, r=rng.randint(0, 5), k=rng.randint(0, 3))
    if t == 1:
        return fill("""#[derive(Debug, thiserror::Error)]
pub enum <<T>>Error {
    #[error("<<n>> {0} not found")]
    NotFound(u64),
    #[error("upstream returned {status}: {body}")]
    Upstream { status: u16, body: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, <<T>>Error>;""", T=T, n=n)
    if t == 2:
        return fill("""async fn <<f>>(
    State(state): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Json<<<T>>>, StatusCode> {
    let row = sqlx::query_as::<_, <<T>>>("SELECT * FROM <<tbl>> WHERE id = $1")
        .bind(id as i64)
        .fetch_optional(&state.pool)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    row.map(Json).ok_or(StatusCode::NOT_FOUND)
}""", f=f, T=T, tbl=rng.choice(TABLES))
    if t == 3:
        a, b = rng.randint(2, 90), rng.randint(2, 90)
        return fill("""#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn <<f>>_handles_empty_input() {
        assert_eq!(<<f>>(&[]), Vec::<u32>::new());
    }

    #[test]
    fn <<f>>_sums_pairs() {
        assert_eq!(<<f>>(&[<<a>>, <<b>>]), vec![<<c>>]);
    }
}""", f=f, a=a, b=b, c=a + b)
    if t == 4:
        return fill("""let totals: HashMap<&str, u64> = <<n>>s
    .iter()
    .filter(|x| x.status != Status::<<S>>)
    .fold(HashMap::new(), |mut acc, x| {
        *acc.entry(x.region.as_str()).or_default() += x.bytes;
        acc
    });
let mut top: Vec<_> = totals.into_iter().collect();
top.sort_by(|a, b| b.1.cmp(&a.1));
top.truncate(<<k>>);""", n=n, S=rng.choice(["Failed", "Cancelled", "Draft", "Skipped"]), k=rng.choice([5, 10, 20]))
    if t == 5:
        return fill("""impl fmt::Display for <<T>> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pending => write!(f, "pending"),
            Self::Running { pid } => write!(f, "running (pid {pid})"),
            Self::Done { code } if *code == 0 => f.write_str("ok"),
            Self::Done { code } => write!(f, "exited with {code}"),
        }
    }
}""", T=T)
    if t == 6:
        return fill("""let (tx, mut rx) = tokio::sync::mpsc::channel::<<<T>>>(<<cap>>);
let worker = tokio::spawn(async move {
    let mut batch = Vec::with_capacity(<<b>>);
    while let Some(item) = rx.recv().await {
        batch.push(item);
        if batch.len() >= <<b>> {
            flush(&mut batch).await?;
        }
    }
    flush(&mut batch).await
});""", T=T, cap=rng.choice([64, 128, 1024]), b=rng.choice([16, 32, 100, 500]))
    if t == 7:
        deps = [("serde", '{ version = "1", features = ["derive"] }'), ("tokio", '{ version = "1.37", features = ["full"] }'),
                ("anyhow", '"1"'), ("reqwest", '{ version = "0.12", default-features = false, features = ["json", "rustls-tls"] }'),
                ("tracing", '"0.1"'), ("clap", '{ version = "4.5", features = ["derive"] }'), ("regex", '"1.10"'), ("sqlx", '{ version = "0.7", features = ["postgres", "runtime-tokio"] }')]
        lines = [f"{k} = {v}" for k, v in pick_n(rng, deps, rng.randint(3, 6))]
        return f"[package]\nname = \"{rng.choice(SERVICES)}\"\nversion = \"{semver(rng, False)}\"\nedition = \"2021\"\n\n[dependencies]\n" + "\n".join(lines)
    return fill("""pub fn <<f>>(input: &str) -> Result<Vec<(String, u32)>, ParseError> {
    input
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').ok_or(ParseError::MissingEquals)?;
            Ok((k.trim().to_owned(), v.trim().parse()?))
        })
        .collect()
}""", f=f)


def neg_code_python(rng):
    T, f, n = type_name(rng), ident(rng), rng.choice(NOUNS)
    t = rng.randrange(9)
    if t == 0:
        return fill('''@dataclass(frozen=True)
class <<T>>:
    id: int
    name: str
    tags: tuple[str, ...] = ()
    weight: float = <<w>>

    def <<f>>(self) -> str:
        return f"{self.name}:{','.join(sorted(self.tags))}"''', T=T, f=f, w=rng.choice(["1.0", "0.5", "0.0"]))
    if t == 1:
        return fill('''@router.get("/<<n>>s/{item_id}", response_model=<<T>>)
async def get_<<n>>(item_id: int, db: AsyncSession = Depends(get_db)) -> <<T>>:
    row = await db.get(<<T>>Model, item_id)
    if row is None:
        raise HTTPException(status_code=404, detail="<<n>> not found")
    return <<T>>.model_validate(row)''', n=n, T=T)
    if t == 2:
        return fill('''import pytest

@pytest.mark.parametrize("raw,expected", [
    ("", []),
    ("a,b", ["a", "b"]),
    (" x , y ,z", ["x", "y", "z"]),
])
def test_<<f>>(raw, expected):
    assert <<f>>(raw) == expected''', f=f)
    if t == 3:
        return fill('''df = pd.read_parquet("s3://<<b>>/<<n>>s/dt=<<d>>/")
daily = (
    df[df["status"] != "<<s>>"]
    .groupby(["region", pd.Grouper(key="created_at", freq="1D")])
    .agg(count=("id", "size"), p95_ms=("latency_ms", lambda s: s.quantile(0.95)))
    .reset_index()
)
print(daily.head(<<k>>))''', b=rng.choice(WORDS) + "-lake", n=n, d=date_only(rng), s=rng.choice(ADJ), k=rng.choice([5, 10, 20]))
    if t == 4:
        return fill('''async def <<f>>(ids: list[int], limit: int = <<c>>) -> list[dict]:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> dict:
        async with sem, httpx.AsyncClient(timeout=<<to>>) as client:
            r = await client.get(f"{BASE_URL}/<<n>>s/{i}")
            r.raise_for_status()
            return r.json()

    return await asyncio.gather(*(one(i) for i in ids))''', f=f, c=rng.choice([4, 8, 16]), to=rng.choice([5, 10, 30]), n=n)
    if t == 5:
        return fill('''def main() -> int:
    parser = argparse.ArgumentParser(description="<<d>>")
    parser.add_argument("--since", type=date.fromisoformat, required=True)
    parser.add_argument("--batch-size", type=int, default=<<bs>>)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    n = <<f>>(args.since, batch_size=args.batch_size, dry_run=args.dry_run)
    log.info("processed %d <<n>>s", n)
    return 0''', d=f"Backfill {n}s", bs=rng.choice([100, 500, 1000]), f=f, n=n)
    if t == 6:
        return fill('''@contextmanager
def <<f>>(path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)''', f=f)
    if t == 7:
        return fill('''def retry(times: int = <<k>>, base: float = <<b>>):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(times):
                try:
                    return fn(*args, **kwargs)
                except TransientError:
                    time.sleep(base * 2 ** attempt)
            return fn(*args, **kwargs)
        return wrapper
    return deco''', k=rng.randint(2, 6), b=rng.choice(["0.1", "0.25", "0.5"]))
    return fill('''class <<T>>Repository:
    def __init__(self, conn):
        self.conn = conn

    def by_status(self, status: str, limit: int = <<l>>) -> list[tuple]:
        cur = self.conn.execute(
            "SELECT id, created_at FROM <<tbl>> WHERE status = ? ORDER BY created_at DESC LIMIT ?",
            (status, limit),
        )
        return cur.fetchall()''', T=T, l=rng.choice([50, 100, 200]), tbl=rng.choice(TABLES))


def neg_code_js_ts(rng):
    T, f, n = type_name(rng), ident(rng, "camel"), rng.choice(NOUNS)
    t = rng.randrange(8)
    if t == 0:
        return fill("""export function <<T>>List({ items, onSelect }: Props) {
  const [query, setQuery] = useState("");
  const visible = useMemo(
    () => items.filter((i) => i.name.toLowerCase().includes(query.toLowerCase())),
    [items, query],
  );
  return (
    <ul className="<<n>>-list">
      {visible.map((i) => (
        <li key={i.id} onClick={() => onSelect(i)}>{i.name}</li>
      ))}
    </ul>
  );
}""", T=T, n=n)
    if t == 1:
        return fill("""router.get("/api/<<n>>s/:id", async (req, res, next) => {
  try {
    const row = await db("<<tbl>>").where({ id: req.params.id }).first();
    if (!row) return res.status(404).json({ error: "not_found" });
    res.set("Cache-Control", "max-age=<<ttl>>");
    res.json(row);
  } catch (err) {
    next(err);
  }
});""", n=n, tbl=rng.choice(TABLES), ttl=rng.choice([30, 60, 300]))
    if t == 2:
        return fill("""export interface <<T>> {
  id: string;
  createdAt: Date;
  status: "pending" | "active" | "archived";
  amountCents: number;
}

export function <<f>>(rows: <<T>>[]): Record<string, number> {
  return rows.reduce<Record<string, number>>((acc, r) => {
    acc[r.status] = (acc[r.status] ?? 0) + r.amountCents;
    return acc;
  }, {});
}""", T=T, f=f)
    if t == 3:
        return fill("""async function <<f>>(path, { retries = <<r>>, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(`${API_BASE}${path}`, { signal, headers: { Accept: "application/json" } });
    if (res.ok) return res.json();
    if (attempt >= retries || res.status < 500) throw new HttpError(res.status, await res.text());
    await new Promise((r) => setTimeout(r, 2 ** attempt * <<ms>>));
  }
}""", f=f, r=rng.randint(1, 5), ms=rng.choice([100, 250, 500]))
    if t == 4:
        return fill("""describe("<<f>>", () => {
  it("returns an empty list for no input", () => {
    expect(<<f>>([])).toEqual([]);
  });

  it("keeps the order of equal keys", () => {
    const out = <<f>>([{ k: 2 }, { k: 1 }, { k: 2 }]);
    expect(out.map((x) => x.k)).toEqual([1, 2, 2]);
  });
});""", f=f)
    if t == 5:
        return fill("""const <<T>>Schema = z.object({
  id: z.string().uuid(),
  quantity: z.number().int().min(1).max(<<mx>>),
  sku: z.string().regex(/^[A-Z]{3}-\\d{4}$/),
  note: z.string().max(280).optional(),
});

export type <<T>> = z.infer<typeof <<T>>Schema>;""", T=T, mx=rng.choice([99, 500, 10000]))
    if t == 6:
        return fill("""const server = http.createServer(app);
server.keepAliveTimeout = <<ka>>;
server.headersTimeout = <<ht>>;
process.on("SIGTERM", () => {
  logger.info("draining connections");
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(1), <<grace>>).unref();
});
server.listen(Number(process.env.PORT ?? <<port>>));""", ka=rng.choice([5000, 65000]), ht=rng.choice([66000, 70000]), grace=rng.choice([10000, 25000]), port=rng.choice([3000, 8080, 4000]))
    return fill("""export const <<f>> = createAsyncThunk("<<n>>s/fetch", async (page: number) => {
  const { data } = await api.get<Page<<<T>>>>(`/<<n>>s`, { params: { page, per_page: <<pp>> } });
  return data;
});""", f=f, n=n, T=T, pp=rng.choice([20, 50, 100]))


def neg_code_go(rng):
    T, f, n = type_name(rng), ident(rng, "pascal"), rng.choice(NOUNS)
    t = rng.randrange(7)
    if t == 0:
        return fill("""func (h *Handler) <<f>>(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(chi.URLParam(r, "id"), 10, 64)
	if err != nil {
		http.Error(w, "bad id", http.StatusBadRequest)
		return
	}
	item, err := h.store.Get(r.Context(), id)
	if errors.Is(err, sql.ErrNoRows) {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(item)
}""", f=f)
    if t == 1:
        return fill("""type <<T>> struct {
	ID        int64     `json:"id" db:"id"`
	Name      string    `json:"name" db:"name"`
	Status    string    `json:"status" db:"status"`
	CreatedAt time.Time `json:"created_at" db:"created_at"`
	Labels    []string  `json:"labels,omitempty"`
}""", T=T)
    if t == 2:
        return fill("""func <<f>>(ctx context.Context, jobs <-chan Job, workers int) error {
	g, ctx := errgroup.WithContext(ctx)
	for i := 0; i < workers; i++ {
		g.Go(func() error {
			for j := range jobs {
				if err := process(ctx, j); err != nil {
					return fmt.Errorf("job %d: %w", j.ID, err)
				}
			}
			return nil
		})
	}
	return g.Wait()
}""", f=f)
    if t == 3:
        return fill("""func Test<<f>>(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want int
	}{
		{"empty", "", 0},
		{"single", "a", 1},
		{"spaces", "a b  c", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := <<f>>(tt.in); got != tt.want {
				t.Errorf("got %d, want %d", got, tt.want)
			}
		})
	}
}""", f=f)
    if t == 4:
        return fill("""ctx, cancel := context.WithTimeout(ctx, <<s>>*time.Second)
defer cancel()
req, _ := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/v1/<<n>>s", nil)
resp, err := client.Do(req)
if err != nil {
	return nil, fmt.Errorf("list <<n>>s: %w", err)
}
defer resp.Body.Close()""", s=rng.choice([2, 5, 10, 30]), n=n)
    if t == 5:
        return f"module github.com/{rng.choice(WORDS)}/{rng.choice(SERVICES)}\n\ngo 1.22\n\nrequire (\n" + "\n".join(
            f"\t{m} v{semver(rng, False)}" for m in pick_n(rng, ["github.com/go-chi/chi/v5", "github.com/jackc/pgx/v5", "golang.org/x/sync", "github.com/prometheus/client_golang", "go.uber.org/zap", "github.com/spf13/cobra", "google.golang.org/grpc"], rng.randint(3, 5))) + "\n)"
    return fill("""var (
	<<n>>Latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "<<svc>>_<<n>>_duration_seconds",
		Help:    "Time spent handling <<n>> requests.",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5},
	}, []string{"route", "code"})
)""", n=n, svc=rng.choice(SERVICES).replace("-", "_"))


def neg_code_java(rng):
    T, f, n = type_name(rng), ident(rng, "camel"), rng.choice(NOUNS)
    pkg = f"com.{rng.choice(WORDS)}.{rng.choice(['billing', 'catalog', 'orders', 'platform', 'search'])}"
    t = rng.randrange(6)
    if t == 0:
        return fill("""package <<pkg>>;

@RestController
@RequestMapping("/api/<<n>>s")
public class <<T>>Controller {
    private final <<T>>Service service;

    public <<T>>Controller(<<T>>Service service) { this.service = service; }

    @GetMapping("/{id}")
    public ResponseEntity<<<T>>Dto> get(@PathVariable long id) {
        return service.find(id).map(ResponseEntity::ok).orElse(ResponseEntity.notFound().build());
    }
}""", pkg=pkg, n=n, T=T)
    if t == 1:
        return fill("""public record <<T>>(long id, String region, BigDecimal amount, Instant createdAt) {}

Map<String, BigDecimal> byRegion = items.stream()
    .filter(i -> i.createdAt().isAfter(cutoff))
    .collect(Collectors.groupingBy(<<T>>::region,
        Collectors.reducing(BigDecimal.ZERO, <<T>>::amount, BigDecimal::add)));""", T=T)
    if t == 2:
        return fill("""class <<T>>ServiceTest {
    @Test
    void <<f>>ReturnsEmptyForUnknownId() {
        var repo = mock(<<T>>Repository.class);
        when(repo.findById(<<id>>L)).thenReturn(Optional.empty());
        var service = new <<T>>Service(repo);
        assertThat(service.find(<<id>>L)).isEmpty();
    }
}""", T=T, f=f, id=rng.randint(1, 999))
    if t == 3:
        return fill("""HttpClient client = HttpClient.newBuilder()
    .connectTimeout(Duration.ofSeconds(<<ct>>))
    .version(HttpClient.Version.HTTP_2)
    .build();
HttpRequest request = HttpRequest.newBuilder(URI.create(baseUrl + "/v1/<<n>>s?limit=<<l>>"))
    .header("Accept", "application/json")
    .GET()
    .build();
HttpResponse<String> response = client.send(request, BodyHandlers.ofString());""", ct=rng.choice([2, 5, 10]), n=n, l=rng.choice([10, 50, 100]))
    if t == 4:
        return fill("""@Entity
@Table(name = "<<tbl>>", indexes = @Index(columnList = "status, created_at"))
public class <<T>> {
    @Id @GeneratedValue(strategy = GenerationType.IDENTITY)
    private Long id;

    @Column(nullable = false, length = <<len>>)
    private String status;

    @Version
    private int version;
}""", tbl=rng.choice(TABLES), T=T, len=rng.choice([16, 32, 64]))
    return fill("""@Scheduled(fixedDelayString = "PT<<m>>M")
public void <<f>>() {
    var stale = repository.findByStatusAndUpdatedAtBefore(Status.<<S>>, Instant.now().minus(<<h>>, ChronoUnit.HOURS));
    log.info("found {} stale <<n>>s", stale.size());
    stale.forEach(this::expire);
}""", m=rng.choice([1, 5, 15]), f=f, S=rng.choice(ADJ).upper(), h=rng.choice([1, 6, 24, 72]), n=n)


def neg_code_c(rng):
    f, n = ident(rng), rng.choice(NOUNS)
    t = rng.randrange(6)
    if t == 0:
        return fill("""typedef struct {
    <<ty>> *buf;
    size_t head, tail, cap;
} <<p>>_ring_t;

static bool <<p>>_push(<<p>>_ring_t *r, <<ty>> item) {
    size_t next = (r->head + 1) % r->cap;
    if (next == r->tail) return false; /* full: drop, caller counts <<p>>_dropped */
    r->buf[r->head] = item;
    r->head = next;
    return true;
}""", ty=rng.choice(["uint8_t", "uint16_t", "int32_t", "struct sample", "void *"]), p=rng.choice(NOUNS))
    if t == 1:
        return fill("""char *<<f>>(const char *src, size_t max) {
    size_t len = strnlen(src, max);
    char *out = malloc(len + 1);
    if (!out) return NULL;
    memcpy(out, src, len);
    out[len] = '\\0';
    return out;
}""", f=f)
    if t == 2:
        return fill("""#ifndef <<G>>_H
#define <<G>>_H

#include <stdint.h>
#include <stddef.h>

#define <<G>>_MAX_ITEMS <<mx>>

int <<f>>(const uint8_t *data, size_t len, uint32_t *out_crc);

#endif /* <<G>>_H */""", G=n.upper(), mx=rng.choice([64, 256, 4096]), f=f)
    if t == 3:
        return fill("""static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

uint32_t <<f>>(const uint8_t *p, size_t n, uint32_t seed) {
    uint32_t h = seed ^ (uint32_t)n;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h = rotl32(h, <<r>>) * 0x9E3779B1u;
    }
    return h ^ (h >> 16);
}""", f=f, r=rng.choice([5, 13, 15]))
    if t == 4:
        return fill("""int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE\\n", argv[0]);
        return 2;
    }
    FILE *fp = fopen(argv[1], "rb");
    if (!fp) { perror("fopen"); return 1; }
    char line[<<sz>>];
    size_t count = 0;
    while (fgets(line, sizeof line, fp)) count++;
    printf("%zu lines\\n", count);
    fclose(fp);
    return 0;
}""", sz=rng.choice([256, 1024, 4096]))
    return fill("""class <<T>>Cache {
public:
    explicit <<T>>Cache(std::size_t capacity) : capacity_(capacity) {}

    std::optional<std::string> get(const std::string& key) {
        auto it = index_.find(key);
        if (it == index_.end()) return std::nullopt;
        items_.splice(items_.begin(), items_, it->second);
        return it->second->second;
    }

private:
    std::size_t capacity_;
    std::list<std::pair<std::string, std::string>> items_;
    std::unordered_map<std::string, decltype(items_)::iterator> index_;
};""", T=type_name(rng))


def neg_code_sql(rng):
    a, b = rng.sample(TABLES, 2)
    t = rng.randrange(8)
    d = date_only(rng)
    if t == 0:
        return fill("""CREATE TABLE <<a>> (
    id           BIGSERIAL PRIMARY KEY,
    tenant_id    BIGINT NOT NULL REFERENCES tenants(id),
    status       TEXT NOT NULL DEFAULT 'pending',
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX <<a>>_tenant_created_idx ON <<a>> (tenant_id, created_at DESC);""", a=a)
    if t == 1:
        return fill("""SELECT o.region,
       date_trunc('day', o.created_at) AS day,
       count(*)                         AS orders,
       sum(i.quantity * i.unit_price)   AS revenue
FROM orders o
JOIN order_items i ON i.order_id = o.id
WHERE o.created_at >= DATE '<<d>>'
  AND o.status NOT IN ('cancelled', 'test')
GROUP BY 1, 2
ORDER BY 2 DESC, 4 DESC
LIMIT <<l>>;""", d=d, l=rng.choice([50, 100, 500]))
    if t == 2:
        return fill("""WITH ranked AS (
    SELECT *, row_number() OVER (PARTITION BY sku ORDER BY changed_at DESC) AS rn
    FROM price_history
    WHERE changed_at < TIMESTAMP '<<d>> 00:00:00'
)
SELECT sku, price, changed_at FROM ranked WHERE rn = 1;""", d=d)
    if t == 3:
        return fill("""ALTER TABLE <<a>> ADD COLUMN IF NOT EXISTS archived_at TIMESTAMPTZ;
UPDATE <<a>> SET archived_at = now() WHERE status = '<<s>>' AND created_at < now() - INTERVAL '<<n>> days';
-- migrate:down
ALTER TABLE <<a>> DROP COLUMN archived_at;""", a=a, s=rng.choice(ADJ), n=rng.choice([30, 90, 365]))
    if t == 4:
        return fill("""INSERT INTO <<a>> (sku, warehouse_id, quantity)
VALUES ('<<sku>>', <<w>>, <<q>>)
ON CONFLICT (sku, warehouse_id)
DO UPDATE SET quantity = <<a>>.quantity + EXCLUDED.quantity, updated_at = now();""", a="inventory_levels", sku=f"{rstr(rng, 3, UPPER)}-{rng.randint(1000, 9999)}", w=rng.randint(1, 40), q=rng.randint(1, 500))
    if t == 5:
        return fill("""EXPLAIN ANALYZE
SELECT e.*
FROM <<a>> e
WHERE e.tenant_id = $1
  AND e.created_at BETWEEN $2 AND $3
ORDER BY e.created_at DESC
LIMIT 100;""", a=a)
    if t == 6:
        return fill("""SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99,
       count(*) FILTER (WHERE status_code >= 500) AS errors
FROM api_calls
WHERE called_at > now() - interval '<<h>> hours'
  AND route LIKE '/v1/%';""", h=rng.choice([1, 6, 24]))
    return fill("""DELETE FROM <<a>>
WHERE id IN (
    SELECT id FROM <<a>>
    WHERE expires_at < now()
    ORDER BY id
    LIMIT <<l>>
    FOR UPDATE SKIP LOCKED
);""", a=rng.choice(["sessions", "jobs", "api_calls", "audit_events"]), l=rng.choice([1000, 5000, 10000]))


def neg_code_shell(rng):
    s = svc(rng)
    t = rng.randrange(8)
    if t == 0:
        return fill("""#!/usr/bin/env bash
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="${DIR}/target/release"

cargo build --release --locked
install -m 0755 "${BUILD}/<<s>>" /usr/local/bin/<<s>>
systemctl restart <<s>>.service
systemctl --no-pager status <<s>>.service | head -n <<n>>""", s=s, n=rng.choice([5, 10, 20]))
    if t == 1:
        return fill("""for f in logs/*.log.gz; do
  n=$(zcat "$f" | grep -c ' 5[0-9][0-9] ' || true)
  printf '%s\\t%s\\n' "$(basename "$f")" "$n"
done | sort -k2 -n -r | head -<<k>>""", k=rng.choice([5, 10, 20]))
    if t == 2:
        return fill("""find /var/lib/<<s>>/cache -type f -mtime +<<d>> -print0 | xargs -0 rm -f
du -sh /var/lib/<<s>>/cache""", s=s, d=rng.choice([3, 7, 14, 30]))
    if t == 3:
        return fill("""until curl -fsS "http://localhost:<<p>>/healthz" > /dev/null; do
  echo "waiting for <<s>>..."
  sleep <<w>>
done
echo "<<s>> is up\"""", p=rng.choice([8080, 9000, 3000, 8000]), s=s, w=rng.choice([1, 2, 5]))
    if t == 4:
        return fill("""rsync -avz --delete --exclude '.git' --exclude 'node_modules' ./dist/ deploy-host:/srv/<<s>>/releases/<<d>>/
ssh deploy-host "ln -sfn /srv/<<s>>/releases/<<d>> /srv/<<s>>/current && sudo systemctl reload nginx\"""", s=s, d=date_only(rng).replace("-", ""))
    if t == 5:
        return fill("""awk -F'\\t' '$<<c>> > <<th>> { n++; sum += $<<c>> } END { printf "%d rows, mean %.2f\\n", n, sum/n }' metrics.tsv""", c=rng.randint(2, 7), th=rng.choice([100, 250, 1000]))
    if t == 6:
        return fill("""git fetch --prune origin
for b in $(git branch -r --merged origin/main | grep -v 'main$' | sed 's#origin/##'); do
  git push origin --delete "$b"
done""")
    return fill("""docker compose -f docker-compose.<<e>>.yml pull
docker compose -f docker-compose.<<e>>.yml up -d --remove-orphans
docker image prune -f --filter "until=<<h>>h\"""", e=rng.choice(ENVS), h=rng.choice([24, 72, 168]))


def neg_config_yaml(rng):
    s = svc(rng)
    t = rng.randrange(6)
    if t == 0:
        return fill("""apiVersion: apps/v1
kind: Deployment
metadata:
  name: <<s>>
  labels: {app: <<s>>, tier: backend}
spec:
  replicas: <<r>>
  selector:
    matchLabels: {app: <<s>>}
  template:
    spec:
      containers:
        - name: <<s>>
          image: ghcr.io/<<org>>/<<s>>:<<v>>
          ports: [{containerPort: <<p>>}]
          resources:
            limits: {cpu: "<<cpu>>", memory: <<mem>>Mi}""", s=s, r=rng.randint(2, 12), org=rng.choice(WORDS), v=semver(rng), p=rng.choice([8080, 9090, 3000]), cpu=rng.choice(["500m", "1", "2"]), mem=rng.choice([256, 512, 1024, 2048]))
    if t == 1:
        return fill("""name: ci
on:
  push:
    branches: [main]
  pull_request:
jobs:
  test:
    runs-on: ubuntu-latest
    timeout-minutes: <<tm>>
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-node@v4
        with: {node-version: <<nv>>, cache: npm}
      - run: npm ci
      - run: npm test -- --ci --maxWorkers=<<w>>""", tm=rng.choice([10, 20, 30]), nv=rng.choice([18, 20, 22]), w=rng.choice([2, 4]))
    if t == 2:
        return fill("""services:
  db:
    image: postgres:<<pg>>
    environment:
      POSTGRES_DB: <<db>>
    volumes: [pgdata:/var/lib/postgresql/data]
  <<s>>:
    build: .
    depends_on: [db]
    ports: ["<<p>>:<<p>>"]
volumes:
  pgdata: {}""", pg=rng.choice([14, 15, 16]), db=s.replace("-", "_"), s=s, p=rng.choice([8080, 8000, 3000]))
    if t == 3:
        return fill("""groups:
  - name: <<s>>
    rules:
      - alert: HighErrorRate
        expr: sum(rate(http_requests_total{job="<<s>>",code=~"5.."}[5m])) / sum(rate(http_requests_total{job="<<s>>"}[5m])) > <<th>>
        for: <<f>>m
        labels: {severity: page}
        annotations:
          summary: "<<s>> 5xx ratio above <<pct>>%\"""", s=s, th=rng.choice(["0.01", "0.05"]), f=rng.choice([5, 10]), pct=rng.choice([1, 5]))
    if t == 4:
        return fill("""replicaCount: <<r>>
image:
  repository: registry.example.net/<<s>>
  tag: "<<v>>"
ingress:
  enabled: true
  className: nginx
  hosts:
    - host: <<s>>.<<e>>.example.net
      paths: [{path: /, pathType: Prefix}]
autoscaling:
  minReplicas: <<r>>
  maxReplicas: <<mx>>
  targetCPUUtilizationPercentage: <<cpu>>""", r=rng.randint(2, 4), s=s, v=semver(rng), e=rng.choice(ENVS), mx=rng.randint(6, 30), cpu=rng.choice([60, 70, 80]))
    return fill("""openapi: 3.0.3
paths:
  /<<n>>s/{id}:
    get:
      operationId: get<<T>>
      parameters:
        - {name: id, in: path, required: true, schema: {type: integer, format: int64}}
      responses:
        "200": {description: OK}
        "404": {description: Not found}""", n=rng.choice(NOUNS), T=type_name(rng))


def neg_dockerfile(rng):
    s = svc(rng)
    t = rng.randrange(4)
    if t == 0:
        return fill("""FROM rust:<<rv>>-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/<<s>> /usr/local/bin/<<s>>
EXPOSE <<p>>
USER 10001
ENTRYPOINT ["/usr/local/bin/<<s>>"]""", rv=rng.choice(["1.77", "1.78", "1.79", "1.80"]), s=s, p=rng.choice([8080, 9000, 8443]))
    if t == 1:
        return fill("""FROM python:<<pv>>-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
EXPOSE <<p>>
CMD ["gunicorn", "-w", "<<w>>", "-b", "0.0.0.0:<<p>>", "<<m>>.wsgi:application"]""", pv=rng.choice(["3.10", "3.11", "3.12"]), p=rng.choice([8000, 5000, 8080]), w=rng.choice([2, 4, 8]), m=s.replace("-", "_"))
    if t == 2:
        return fill("""FROM node:<<nv>>-alpine AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev

FROM node:<<nv>>-alpine
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY . .
ENV NODE_ENV=production PORT=<<p>>
HEALTHCHECK --interval=30s --timeout=3s CMD wget -qO- http://localhost:<<p>>/healthz || exit 1
CMD ["node", "server.js"]""", nv=rng.choice([18, 20, 22]), p=rng.choice([3000, 8080]))
    return fill("""FROM golang:<<gv>> AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.version=<<v>>" -o /out/<<s>> ./cmd/<<s>>

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/<<s>> /<<s>>
ENTRYPOINT ["/<<s>>"]""", gv=rng.choice(["1.21", "1.22", "1.23"]), v=semver(rng), s=s)


# ---- stack traces ------------------------------------------------------------


def neg_stacktrace_python(rng):
    mod = rng.choice(SERVICES).replace("-", "_")
    frames = []
    for _ in range(rng.randint(2, 5)):
        fn = ident(rng)
        frames.append(f'  File "/app/{mod}/{rng.choice(NOUNS)}.py", line {rng.randint(12, 640)}, in {fn}\n    {rng.choice(["result = " + ident(rng) + "(payload)", "return self._session.execute(stmt)", "data = json.loads(raw)", "value = cfg[key]", "rows = await conn.fetch(query, *args)", "resp.raise_for_status()"])}')
    lib = rng.choice([
        '  File "/usr/local/lib/python3.11/site-packages/httpx/_models.py", line 761, in raise_for_status\n    raise HTTPStatusError(message, request=request, response=self)',
        '  File "/usr/lib/python3.12/json/decoder.py", line 355, in raw_decode\n    raise JSONDecodeError("Expecting value", s, err.value) from None',
        '  File "/usr/local/lib/python3.11/site-packages/sqlalchemy/engine/base.py", line 1969, in _exec_single_context\n    self.dialect.do_execute(',
    ])
    exc = rng.choice([
        f"KeyError: '{rng.choice(NOUNS)}_id'",
        f"json.decoder.JSONDecodeError: Expecting value: line 1 column {rng.randint(1, 80)} (char {rng.randint(0, 79)})",
        f"httpx.HTTPStatusError: Server error '503 Service Unavailable' for url 'http://{svc(rng)}:8080/v1/{rng.choice(NOUNS)}s'",
        f"TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'",
        f"AttributeError: 'NoneType' object has no attribute '{rng.choice(VERBS)}'",
        f"ValueError: invalid literal for int() with base 10: '{rng.choice(['abc', 'n/a', '12.5', ''])}'",
        f"sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) server closed the connection unexpectedly",
    ])
    head = "Traceback (most recent call last):\n"
    if rng.random() < 0.3:
        head = f"{plain_ts(rng, ms=True)} ERROR [{mod}] unhandled exception in worker\n" + head
    return head + "\n".join(frames) + ("\n" + lib if rng.random() < 0.6 else "") + "\n" + exc


def neg_stacktrace_java(rng):
    pkg = f"com.{rng.choice(WORDS)}.{rng.choice(['billing', 'catalog', 'orders', 'platform', 'search'])}"
    exc = rng.choice([
        "java.lang.NullPointerException: Cannot invoke \"String.length()\" because \"name\" is null",
        f"java.lang.IllegalStateException: {rng.choice(NOUNS)} already closed",
        "java.util.concurrent.TimeoutException: null",
        f"java.lang.IndexOutOfBoundsException: Index {rng.randint(1, 9)} out of bounds for length {rng.randint(0, 1)}",
        "org.springframework.dao.DataIntegrityViolationException: could not execute statement",
        "java.net.SocketTimeoutException: Read timed out",
    ])
    lines = [f"Exception in thread \"{rng.choice(['main', 'pool-2-thread-1', 'http-nio-8080-exec-7', 'scheduling-1'])}\" {exc}"]
    for _ in range(rng.randint(3, 7)):
        cls = type_name(rng) + rng.choice(["Service", "Controller", "Repository", "Mapper", "Client"])
        lines.append(f"\tat {pkg}.{cls}.{ident(rng, 'camel')}({cls}.java:{rng.randint(20, 900)})")
    lines.append(rng.choice(["\tat java.base/java.util.concurrent.ThreadPoolExecutor.runWorker(ThreadPoolExecutor.java:1136)",
                             "\tat org.springframework.web.servlet.FrameworkServlet.service(FrameworkServlet.java:885)",
                             "\tat java.base/java.lang.Thread.run(Thread.java:1583)"]))
    if rng.random() < 0.4:
        lines.append(f"Caused by: java.sql.SQLTransientConnectionException: HikariPool-1 - Connection is not available, request timed out after {rng.choice([30000, 10000])}ms.")
        lines.append("\tat com.zaxxer.hikari.pool.HikariPool.createTimeoutException(HikariPool.java:696)")
        lines.append(f"\t... {rng.randint(8, 60)} more")
    return "\n".join(lines)


def neg_stacktrace_node(rng):
    exc = rng.choice([
        f"TypeError: Cannot read properties of undefined (reading '{rng.choice(['map', 'length', 'id', 'status', 'data'])}')",
        f"Error: connect ECONNREFUSED 127.0.0.1:{rng.choice([5432, 6379, 27017, 3306])}",
        "RangeError: Maximum call stack size exceeded",
        f"ReferenceError: {ident(rng, 'camel')} is not defined",
        "SyntaxError: Unexpected token '<', \"<!DOCTYPE \"... is not valid JSON",
        "Error [ERR_HTTP_HEADERS_SENT]: Cannot set headers after they are sent to the client",
    ])
    lines = [exc]
    for _ in range(rng.randint(2, 6)):
        lines.append(f"    at {ident(rng, 'camel')} (/app/{rng.choice(['src', 'dist', 'lib'])}/{rng.choice(NOUNS)}/{ident(rng, 'camel')}.js:{rng.randint(5, 400)}:{rng.randint(3, 60)})")
    lines += rng.sample(["    at process.processTicksAndRejections (node:internal/process/task_queues:95:5)",
                         "    at Module._compile (node:internal/modules/cjs/loader:1256:14)",
                         "    at Layer.handle [as handle_request] (/app/node_modules/express/lib/router/layer.js:95:5)",
                         "    at TCPConnectWrap.afterConnect [as oncomplete] (node:net:1555:16)"], 2)
    if rng.random() < 0.3:
        lines.append(f"Node.js v{rng.choice(['18.19.1', '20.12.2', '22.2.0'])}")
    return "\n".join(lines)


def neg_panic_rust(rng):
    crate = rng.choice(SERVICES).replace("-", "_")
    msg = rng.choice([
        "called `Option::unwrap()` on a `None` value",
        f"called `Result::unwrap()` on an `Err` value: Os {{ code: 2, kind: NotFound, message: \"No such file or directory\" }}",
        f"index out of bounds: the len is {rng.randint(0, 8)} but the index is {rng.randint(8, 20)}",
        "attempt to subtract with overflow",
        f"byte index {rng.randint(3, 30)} is not a char boundary; it is inside 'é' (bytes 2..4) of `café`",
        "already borrowed: BorrowMutError",
        f"assertion `left == right` failed\n  left: {rng.randint(0, 50)}\n right: {rng.randint(51, 99)}",
    ])
    where = f"src/{rng.choice(NOUNS)}.rs:{rng.randint(10, 700)}:{rng.randint(5, 40)}"
    head = f"thread '{rng.choice(['main', 'tokio-runtime-worker', 'worker-3', crate + '::tests::' + ident(rng)])}' panicked at {where}:\n{msg}"
    if rng.random() < 0.4:
        return head + "\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace"
    frames = ["stack backtrace:", "   0: rust_begin_unwind", "             at /rustc/" + rhex(rng, 40) + "/library/std/src/panicking.rs:645:5",
              "   1: core::panicking::panic_fmt"]
    for i in range(2, rng.randint(4, 7)):
        frames.append(f"   {i}: {crate}::{rng.choice(NOUNS)}::{ident(rng)}\n             at ./src/{rng.choice(NOUNS)}.rs:{rng.randint(10, 700)}:{rng.randint(5, 40)}")
    frames.append("note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.")
    return head + "\n" + "\n".join(frames)


# ---- payloads and logs -------------------------------------------------------


def neg_json_api_payload(rng):
    t = rng.randrange(7)
    if t == 0:
        obj = {"id": f"ord_{rstr(rng, 14)}", "status": rng.choice(["paid", "shipped", "pending"]), "currency": rng.choice(["usd", "eur", "gbp"]),
               "items": [{"sku": f"{rstr(rng, 3, UPPER)}-{rng.randint(1000, 9999)}", "qty": rng.randint(1, 5), "unit_amount": rng.randint(199, 9999)} for _ in range(rng.randint(1, 3))],
               "created": epoch_s(rng), "livemode": rng.random() < 0.5}
    elif t == 1:
        obj = {"data": [{"id": rng.randint(1, 99999), "type": rng.choice(NOUNS), "attributes": {"name": f"{rng.choice(WORDS)}-{rng.randint(1, 99)}", "state": rng.choice(ADJ)}} for _ in range(rng.randint(1, 3))],
               "meta": {"page": rng.randint(1, 20), "per_page": rng.choice([20, 50, 100]), "total": rng.randint(100, 9000)},
               "links": {"next": f"/api/v1/{rng.choice(NOUNS)}s?page={rng.randint(2, 21)}"}}
    elif t == 2:
        obj = {"id": "chatcmpl-" + rstr(rng, 29), "object": "chat.completion", "created": epoch_s(rng), "model": rng.choice(["gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"]),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": rng.choice(["The build failed because the lockfile is out of date.", "Here is the refactored function.", "Sure - the query groups by region first."])}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": rng.randint(20, 4000), "completion_tokens": rng.randint(5, 900), "total_tokens": rng.randint(4000, 5000)}}
    elif t == 3:
        obj = {"error": {"code": rng.choice(["rate_limited", "invalid_request", "not_found", "conflict"]), "message": rng.choice(["Too many requests, retry after 12 seconds.", "Field 'quantity' must be positive.", "Resource was modified concurrently."]),
                         "request_id": f"req_{rstr(rng, 24)}", "retry_after": rng.choice([None, 12, 30])}}
    elif t == 4:
        obj = {"event": rng.choice(["deployment.succeeded", "build.failed", "release.published"]), "repository": f"{rng.choice(WORDS)}/{svc(rng)}", "ref": "refs/heads/main",
               "sha": rhex(rng, 40), "run_id": rng.randint(10**9, 10**10 - 1), "duration_s": rng.randint(30, 1800), "environment": rng.choice(ENVS)}
    elif t == 5:
        obj = {"location": {"city": rng.choice(["Lisbon", "Denver", "Osaka", "Nairobi", "Oslo"]), "lat": round(rng.uniform(-60, 60), 4), "lon": round(rng.uniform(-170, 170), 4)},
               "current": {"temp_c": round(rng.uniform(-10, 38), 1), "wind_kph": round(rng.uniform(0, 60), 1), "condition": rng.choice(["Clear", "Light rain", "Overcast"])},
               "updated_at": iso_ts(rng)}
    else:
        obj = {"metric": f"{svc(rng).replace('-', '_')}_requests_total", "window": "5m", "series": [{"labels": {"code": c, "route": rng.choice(HTTP_PATHS)}, "value": round(rng.uniform(0, 900), 2)} for c in rng.sample(["200", "404", "500", "503"], 2)]}
    return jdump(rng, obj)


def nginx_line(rng, t):
    ip = rng.choice([private_ipv4(rng), private_ipv4(rng), ipv6(rng)])
    m = rng.choice(["GET", "GET", "GET", "POST", "PUT", "DELETE", "HEAD"])
    path = rng.choice(HTTP_PATHS) + (f"?page={rng.randint(1, 40)}" if rng.random() < 0.2 else "")
    st = rng.choice([200, 200, 200, 201, 204, 301, 304, 400, 401, 404, 429, 499, 500, 502, 503])
    size = rng.randint(0, 250000)
    ref = rng.choice(["-", f"https://{rng.choice(DOMAINS)}/", f"https://{rng.choice(DOMAINS)}{rng.choice(HTTP_PATHS)}"])
    return f"{ip} - - [{clf_ts(rng, t)}] \"{m} {path} HTTP/{rng.choice(['1.1', '2.0'])}\" {st} {size} \"{ref}\" \"{rng.choice(UAS)}\""


def neg_access_log(rng):
    t0 = epoch_s(rng)
    k = rng.randrange(3)
    lines = []
    for i in range(rng.randint(2, 8)):
        t = t0 + i * rng.randint(0, 3)
        line = nginx_line(rng, t)
        if k == 1:
            line += f" rt={rng.uniform(0.001, 2.5):.3f} uct=\"{rng.uniform(0, 0.01):.3f}\" urt=\"{rng.uniform(0.001, 2.4):.3f}\" req_id={rhex(rng, 32)}"
        elif k == 2:
            line += f" {rng.randint(100, 2_000_000)}"
        lines.append(line)
    return "\n".join(lines)


def neg_app_log(rng):
    s = svc(rng)
    t0 = epoch_s(rng)
    k = rng.randrange(4)
    lines = []
    for i in range(rng.randint(3, 9)):
        ts = iso_ts(rng, t0 + i)
        lvl = rng.choice(["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"])
        msg = rng.choice([f"{ident(rng)} completed", "cache miss", "retrying request", "connection pool exhausted", f"processed batch of {rng.randint(1, 500)} {rng.choice(NOUNS)}s",
                          "upstream timeout", "lease renewed", f"scheduled {rng.choice(NOUNS)} sweep", "config reloaded"])
        if k == 0:
            lines.append(f"time={ts} level={lvl.lower()} service={s} msg=\"{msg}\" duration_ms={rng.randint(1, 4000)} trace_id={rhex(rng, 32)}")
        elif k == 1:
            lines.append(json.dumps({"ts": ts, "level": lvl.lower(), "svc": s, "msg": msg, "request_id": uuid4(rng), "elapsed_ms": round(rng.uniform(0.1, 900), 2)}))
        elif k == 2:
            lines.append(f"{plain_ts(rng, t0 + i, ms=True)} {lvl:<5} [{rng.choice(['main', 'worker-1', 'worker-2', 'http-nio-8080-exec-3'])}] {type_name(rng)}Service - {msg}")
        else:
            lines.append(f"{ts} {s}[{rng.randint(100, 65000)}]: {lvl} {msg} (attempt {rng.randint(1, 5)}/5)")
    return "\n".join(lines)


def neg_sql_result(rng):
    k = rng.randrange(3)
    cols = rng.choice([("region", "orders", "revenue"), ("status", "count", "avg_ms"), ("sku", "warehouse", "qty"), ("day", "api_calls", "errors")])
    rows = []
    for _ in range(rng.randint(3, 8)):
        if cols[0] == "region":
            rows.append((rng.choice(REGIONS), str(rng.randint(10, 99999)), f"{rng.uniform(100, 999999):.2f}"))
        elif cols[0] == "status":
            rows.append((rng.choice(ADJ), str(rng.randint(1, 50000)), f"{rng.uniform(1, 900):.1f}"))
        elif cols[0] == "sku":
            rows.append((f"{rstr(rng, 3, UPPER)}-{rng.randint(1000, 9999)}", f"WH{rng.randint(1, 40):02d}", str(rng.randint(0, 900))))
        else:
            rows.append((date_only(rng), str(rng.randint(1000, 900000)), str(rng.randint(0, 900))))
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    if k == 0:
        out = [" " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cols)), "-" + "-+-".join("-" * x for x in w) + "-"]
        out += [" " + " | ".join(v.rjust(w[i]) if v.replace(".", "").isdigit() else v.ljust(w[i]) for i, v in enumerate(r)) for r in rows]
        out.append(f"({len(rows)} rows)")
        return f"{rng.choice(['analytics', 'app', 'warehouse'])}=> SELECT {', '.join(cols)} FROM report_{cols[0]} LIMIT {len(rows)};\n" + "\n".join(out)
    if k == 1:
        sep = "+" + "+".join("-" * (x + 2) for x in w) + "+"
        out = [sep, "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(cols)) + " |", sep]
        out += ["| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(r)) + " |" for r in rows]
        out += [sep, f"{len(rows)} rows in set ({rng.uniform(0, 2):.2f} sec)"]
        return "mysql> SELECT " + ", ".join(cols) + " FROM v_" + cols[0] + ";\n" + "\n".join(out)
    out = ["\t".join(cols)] + ["\t".join(r) for r in rows]
    return f"sqlite> .mode tabs\nsqlite> SELECT * FROM {cols[0]}_summary;\n" + "\n".join(out)


def neg_csv_rows(rng):
    k = rng.randrange(5)
    n = rng.randint(3, 10)
    if k == 0:
        rows = ["sku,name,category,price,stock"] + [f"{rstr(rng, 3, UPPER)}-{rng.randint(1000, 9999)},{rng.choice(WORDS).capitalize()} {rng.choice(['Mug', 'Lamp', 'Cable', 'Desk', 'Chair', 'Backpack'])},{rng.choice(['home', 'office', 'outdoor'])},{rng.uniform(3, 400):.2f},{rng.randint(0, 900)}" for _ in range(n)]
    elif k == 1:
        t0 = epoch_s(rng)
        rows = ["timestamp,sensor_id,temperature_c,humidity_pct"] + [f"{iso_ts(rng, t0 + 60 * i, ms=False)},S-{rng.randint(100, 999)},{rng.uniform(15, 30):.2f},{rng.uniform(20, 80):.1f}" for i in range(n)]
    elif k == 2:
        rows = ["date,requests,errors,p50_ms,p99_ms"] + [f"{date_only(rng)},{rng.randint(10000, 9000000)},{rng.randint(0, 5000)},{rng.randint(5, 90)},{rng.randint(100, 3000)}" for _ in range(n)]
    elif k == 3:
        rows = ["hostname,ip,os,cpus,mem_gb,rack"] + [f"{rng.choice(['web', 'db', 'cache', 'worker'])}-{rng.randint(1, 40):02d},{private_ipv4(rng)},{rng.choice(['debian12', 'ubuntu22.04', 'rocky9'])},{rng.choice([4, 8, 16, 32])},{rng.choice([16, 32, 64, 128])},R{rng.randint(1, 12)}" for _ in range(n)]
    else:
        rows = ["symbol,date,open,high,low,close,volume"] + [f"{rstr(rng, rng.randint(3, 4), UPPER)},{date_only(rng)},{rng.uniform(10, 500):.2f},{rng.uniform(10, 500):.2f},{rng.uniform(10, 500):.2f},{rng.uniform(10, 500):.2f},{rng.randint(10000, 90000000)}" for _ in range(n)]
    return "\n".join(rows)


# ---- ids, hashes, encodings ---------------------------------------------------

UUID_DOC = "123e4567-e89b-12d3-a456-426614174000"


def some_uuid(rng):
    k = rng.randrange(8)
    upper = rng.random() < 0.25
    if k == 0:
        return UUID_DOC.upper() if upper else UUID_DOC
    if k in (1, 2):
        return uuid1(rng, upper)
    if k in (3, 4):
        return uuid7(rng, upper)
    return uuid4(rng, upper)


def neg_uuid(rng):
    t = rng.randrange(7)
    if t == 0:
        return "\n".join(f"{iso_ts(rng)} INFO {svc(rng)} request_id={some_uuid(rng)} status={rng.choice([200, 201, 204, 404])} took={rng.randint(1, 900)}ms" for _ in range(rng.randint(2, 5)))
    if t == 1:
        return f"const {rng.choice(NOUNS).upper()}_NAMESPACE = \"{some_uuid(rng)}\";\nconst id = uuidv5(name, {rng.choice(NOUNS).upper()}_NAMESPACE);"
    if t == 2:
        return f"SELECT * FROM {rng.choice(TABLES)} WHERE id = '{some_uuid(rng)}'::uuid;\n-- also seen: {some_uuid(rng)}"
    if t == 3:
        return json.dumps({"id": some_uuid(rng), "parent_id": some_uuid(rng), "trace": {"span_id": rhex(rng, 16), "trace_id": rhex(rng, 32)}, "kind": rng.choice(NOUNS)}, indent=2)
    if t == 4:
        return f"Can you explain why `uuid.UUID(\"{some_uuid(rng)}\").version` returns {rng.choice([1, 4, 7])} here? We generate them with uuid{rng.choice([1, 4, 7])}() in {svc(rng)}."
    if t == 5:
        return f"$ uuidgen\n{uuid4(rng, upper=True)}\n$ cat /proc/sys/kernel/random/uuid\n{uuid4(rng)}"
    return f"[[{rng.choice(NOUNS)}]]\nid = \"{some_uuid(rng)}\"\nname = \"{rng.choice(WORDS)}\"\n\n[[{rng.choice(NOUNS)}]]\nid = \"{some_uuid(rng)}\"\nname = \"{rng.choice(WORDS)}\""


def neg_hex_hash(rng):
    t = rng.randrange(7)
    files = [f"{svc(rng)}-{semver(rng, False)}-{rng.choice(['x86_64-unknown-linux-gnu', 'aarch64-apple-darwin', 'linux-amd64'])}.tar.gz" for _ in range(rng.randint(2, 4))]
    if t == 0:
        return "$ sha256sum dist/*\n" + "\n".join(f"{rhex(rng, 64)}  dist/{f}" for f in files)
    if t == 1:
        return "\n".join(f"MD5 ({f}) = {rhex(rng, 32)}" for f in files)
    if t == 2:
        return "\n".join(f"[[package]]\nname = \"{rng.choice(['serde', 'tokio', 'regex', 'bytes', 'hyper', 'rand', 'itoa'])}\"\nversion = \"{semver(rng, False)}\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"{rhex(rng, 64)}\"" for _ in range(rng.randint(1, 3)))
    if t == 3:
        return f"HTTP/1.1 200 OK\nETag: \"{rhex(rng, 32)}\"\nContent-Type: application/javascript\nCache-Control: public, max-age=31536000, immutable\nX-Cache: {rng.choice(['HIT', 'MISS'])}"
    if t == 4:
        return "\n".join(f"{rhex(rng, 40)}  {f}" for f in files) + "\n# sha1 checksums, verify with shasum -c"
    if t == 5:
        return f"asset main.{rhex(rng, 8)}.js {rng.randint(50, 900)} KiB [emitted] [immutable] (name: main)\nasset vendor.{rhex(rng, 8)}.js {rng.randint(100, 2000)} KiB [emitted] [immutable]\nwebpack compiled successfully in {rng.randint(900, 30000)} ms"
    return f"<script src=\"https://cdn.example.net/lib/{rng.choice(WORDS)}.min.js\" integrity=\"sha384-{b64(rbytes(rng, 48))}\" crossorigin=\"anonymous\"></script>"


def neg_base64_blob(rng):
    t = rng.randrange(7)
    if t == 0:
        png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rbytes(rng, rng.randint(60, 400))
        return f"<img alt=\"{rng.choice(WORDS)} icon\" src=\"data:image/png;base64,{b64(png)}\" />"
    if t == 1:
        gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + rbytes(rng, rng.randint(80, 500))
        return f"{iso_ts(rng)} DEBUG {svc(rng)} compressed payload ({rng.randint(1, 90)} KiB raw): {b64(gz)}"
    if t == 2:
        return f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {svc(rng)}-assets\nbinaryData:\n  font.woff2: {b64(b'wOF2' + rbytes(rng, rng.randint(90, 300)))}"
    if t == 3:
        return f"Content-MD5: {b64(rbytes(rng, 16))}\nx-amz-checksum-sha256: {b64(rbytes(rng, 32))}\nContent-Length: {rng.randint(1000, 900000)}"
    if t == 4:
        body = b64(rbytes(rng, rng.choice([294, 422, 550])))
        return f"-----BEGIN PUBLIC KEY-----\n{wrap(body)}\n-----END PUBLIC KEY-----"
    if t == 5:
        return f"ssh-ed25519 {b64(bytes.fromhex('0000000b7373682d65643235353139000000') + rbytes(rng, 32))} {rng.choice(['deploy-key', 'ci', 'build-agent'])}"
    return f"grpcurl output (bytes field, base64): {{\"blob\": \"{b64(rbytes(rng, rng.randint(40, 200)))}\", \"crc32c\": {rng.randint(10**6, 10**9)}}}"


def neg_git_log(rng):
    t = rng.randrange(6)
    subjects = ["Fix off-by-one in pagination", "Bump serde from 1.0.197 to 1.0.203", "Add retry budget to upstream client", "Refactor config loading",
                "Merge pull request #" + str(rng.randint(100, 9999)) + f" from {rng.choice(WORDS)}/fix-cache", "Revert \"Enable HTTP/3\"", "docs: clarify rate limits",
                "chore(deps): update lockfile", "feat: export usage as CSV", "test: cover empty batch", "perf: avoid clone in hot loop", "ci: cache cargo registry"]
    if t == 0:
        return "$ git log --oneline -n 8\n" + "\n".join(f"{rhex(rng, rng.choice([7, 7, 8, 9]))} {rng.choice(subjects)}" for _ in range(rng.randint(4, 8)))
    if t == 1:
        return "\n".join(f"{rhex(rng, 40)} {plain_ts(rng)} +0000 {rng.choice(subjects)}" for _ in range(rng.randint(3, 6)))
    if t == 2:
        return f"$ git rev-parse HEAD\n{rhex(rng, 40)}\n$ git describe --tags\nv{semver(rng, False)}-{rng.randint(1, 80)}-g{rhex(rng, 7)}"
    if t == 3:
        sha = rhex(rng, 40)
        return f"$ git bisect good\nBisecting: {rng.randint(2, 60)} revisions left to test after this (roughly {rng.randint(1, 6)} steps)\n[{sha}] {rng.choice(subjects)}"
    if t == 4:
        return "\n".join(f"{rhex(rng, 8)} {rng.randint(1, 400):>4}) {rng.choice(['    let x = parse(input)?;', '    return None', '    if cfg.retries > 0 {', '}'])}" for _ in range(rng.randint(3, 6)))
    return "$ git reflog -n 5\n" + "\n".join(f"{rhex(rng, 7)} HEAD@{{{i}}}: {rng.choice(['commit', 'checkout: moving from main to fix', 'rebase (finish)', 'pull: Fast-forward'])}: {rng.choice(subjects)}" for i in range(5))


# ---- numbers that look like other things -------------------------------------


def luhn_ms(rng):
    return luhn_complete(str(rng.randint(1_500_000_000_000, 1_760_000_000_000))[:-1])


def neg_unix_timestamp(rng):
    t = rng.randrange(8)
    ms = luhn_ms(rng)
    if t == 0:
        return json.dumps({"event": rng.choice(NOUNS) + "." + rng.choice(["created", "updated"]), "ts": int(ms), "received_at": int(luhn_ms(rng)), "seq": rng.randint(1, 99999)})
    if t == 1:
        return "\n".join(f"{luhn_ms(rng)} {rng.choice(['INFO', 'DEBUG', 'WARN'])} {svc(rng)} {ident(rng)} ok" for _ in range(rng.randint(3, 6)))
    if t == 2:
        s = epoch_s(rng)
        return f"$ date +%s\n{s}\n$ date -d @{s} -u\n{plain_ts(rng, s)} UTC"
    if t == 3:
        return f"const expiresAt = {ms}; // Date.now() + ttl\nif (Date.now() > expiresAt) {{ refresh(); }}"
    if t == 4:
        return f"cache key: {rng.choice(NOUNS)}:{rng.randint(1, 9999)}:{ms}\nexpires: {epoch_s(rng)}"
    if t == 5:
        return f"SELECT to_timestamp({epoch_s(rng)}) AS created, to_timestamp({ms} / 1000.0) AS updated;"
    if t == 6:
        return f"{rng.choice(['lastModified', 'mtime_ms', 'updatedAtMs'])}={ms} size={rng.randint(100, 99999)} etag={rhex(rng, 16)}"
    return f"Span start {luhn_ms(rng)}{rng.randint(100000, 999999)} ns, end {luhn_ms(rng)}{rng.randint(100000, 999999)} ns (OpenTelemetry unix nanos)."


def neg_iso_datetime(rng):
    t = rng.randrange(6)
    if t == 0:
        start = epoch_s(rng)
        return f"Maintenance window: {iso_ts(rng, start, ms=False)} to {iso_ts(rng, start + rng.choice([1800, 3600, 7200, 14400]), ms=False)}. Expect elevated latency on {svc(rng)}."
    if t == 1:
        return json.dumps({"created_at": iso_ts(rng), "updated_at": iso_ts(rng, z=False), "valid_from": date_only(rng), "valid_until": date_only(rng)}, indent=2)
    if t == 2:
        return f"# schedule: {rng.randint(0, 59)} {rng.randint(0, 23)} * * {rng.randint(0, 6)}\nlast run: {plain_ts(rng)} UTC\nnext run: {plain_ts(rng)} UTC"
    if t == 3:
        return f"## [{semver(rng, False)}] - {date_only(rng)}\n### Fixed\n- {rng.choice(['Pagination cursor', 'Retry jitter', 'CSV export'])} ({date_only(rng)} regression)"
    if t == 4:
        return f"Between {date_only(rng)} and {date_only(rng)} the {rng.choice(NOUNS)} backlog grew from {rng.randint(10, 900)} to {rng.randint(1000, 90000)} items."
    return f"Last-Modified: {rng.choice(['Mon', 'Tue', 'Wed', 'Thu', 'Fri'])}, {rng.randint(1, 28):02d} {rng.choice(['Jan', 'Mar', 'Jun', 'Oct'])} {rng.randint(2019, 2025)} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} GMT\nExpires: {iso_ts(rng, ms=False)}"


def neg_ip_address(rng):
    t = rng.randrange(7)
    if t == 0:
        mac = ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))
        return f"2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc mq state UP group default qlen 1000\n    link/ether {mac} brd ff:ff:ff:ff:ff:ff\n    inet {private_ipv4(rng)}/{rng.choice([16, 20, 24])} brd {private_ipv4(rng)} scope global dynamic eth0\n    inet6 {ipv6(rng)}/64 scope link"
    if t == 1:
        return "\n".join(f"{rng.choice(['allow', 'deny'])} {private_ipv4(rng)}/{rng.choice([8, 16, 24, 32])};" for _ in range(rng.randint(2, 5))) + "\ndeny all;"
    if t == 2:
        return f"traceroute to {rng.choice(DOMAINS)} ({private_ipv4(rng)}), 30 hops max\n" + "\n".join(f" {i}  {private_ipv4(rng)}  {rng.uniform(0.2, 40):.3f} ms  {rng.uniform(0.2, 40):.3f} ms" for i in range(1, rng.randint(3, 7)))
    if t == 3:
        return f"iptables -A INPUT -p tcp -s {private_ipv4(rng)}/24 --dport {rng.choice([22, 5432, 6379, 9200])} -j ACCEPT\niptables -A INPUT -p tcp --dport {rng.choice([22, 5432, 6379])} -j DROP"
    if t == 4:
        return f";; ANSWER SECTION:\n{rng.choice(DOMAINS)}.\t{rng.choice([60, 300, 3600])}\tIN\tA\t{private_ipv4(rng)}\n{rng.choice(DOMAINS)}.\t{rng.choice([60, 300])}\tIN\tAAAA\t{ipv6(rng)}\n;; Query time: {rng.randint(1, 80)} msec\n;; SERVER: 1.1.1.1#53(1.1.1.1) (UDP)"
    if t == 5:
        return "\n".join(f"tcp   LISTEN 0      {rng.choice([128, 511, 4096])}   {rng.choice(['0.0.0.0', '127.0.0.1', '[::]', private_ipv4(rng)])}:{rng.choice([22, 80, 443, 5432, 6379, 8080, 9090])}   0.0.0.0:*" for _ in range(rng.randint(2, 5)))
    return f"upstream {svc(rng).replace('-', '_')} {{\n" + "\n".join(f"    server {private_ipv4(rng)}:{rng.choice([8080, 9000])} max_fails=3 fail_timeout=30s;" for _ in range(rng.randint(2, 4))) + f"\n    server [{ipv6(rng)}]:8080 backup;\n}}"


def neg_version_string(rng):
    t = rng.randrange(7)
    if t == 0:
        return f"{svc(rng)} {semver(rng, False)}-{rng.choice(['beta', 'rc', 'alpha'])}.{rng.randint(1, 9)}+build.{rng.randint(1000, 9999)}\ncommit {rhex(rng, 9)}, built {date_only(rng)}"
    if t == 1:
        pk = ["requests", "numpy", "pandas", "fastapi", "pydantic", "SQLAlchemy", "httpx", "uvicorn", "boto3", "pytest"]
        return "\n".join(f"{p}=={semver(rng, False)}" for p in pick_n(rng, pk, rng.randint(4, 8)))
    if t == 2:
        return f"$ node --version\nv{rng.choice(['18.19.1', '20.12.2', '22.3.0'])}\n$ npm --version\n{semver(rng, False)}\n$ rustc --version\nrustc 1.{rng.randint(70, 82)}.{rng.randint(0, 2)} ({rhex(rng, 9)} {date_only(rng)})"
    if t == 3:
        return json.dumps({"dependencies": {d: rng.choice(["^", "~", ""]) + semver(rng) for d in pick_n(rng, ["react", "react-dom", "next", "zod", "axios", "lodash", "dayjs", "typescript"], 5)}}, indent=2)
    if t == 4:
        return f"versionName \"{semver(rng, False)}\"\nversionCode {rng.randint(2019, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(1, 99):02d}"
    if t == 5:
        return f"Client Version: v1.{rng.randint(26, 31)}.{rng.randint(0, 9)}\nKustomize Version: v5.{rng.randint(0, 4)}.{rng.randint(0, 3)}\nServer Version: v1.{rng.randint(26, 31)}.{rng.randint(0, 9)}-eks-{rhex(rng, 7)}"
    return f"Upgrading {svc(rng)} from {semver(rng)} to {semver(rng)} (build {date_only(rng).replace('-', '.')}.{rng.randint(1, 40)}, image tag {semver(rng, False)}-{rhex(rng, 7)})"


def neg_order_number(rng):
    t = rng.randrange(6)
    amz = f"{rng.randint(100, 114)}-{rng.randint(10**6, 10**7 - 1)}-{rng.randint(10**6, 10**7 - 1)}"
    if t == 0:
        return f"Your order {amz} has shipped. Estimated delivery: {date_only(rng)}. Items: {rng.randint(1, 4)}."
    if t == 1:
        return f"Order #{rng.randint(100000000, 109999999)} status changed: {rng.choice(['paid', 'fulfilled', 'refunded', 'partially_refunded'])} -> {rng.choice(['fulfilled', 'closed'])}"
    if t == 2:
        return f"PO-{rng.randint(2022, 2025)}-{rng.randint(1, 99999):05d} approved. Lines: {rng.randint(1, 40)}. Total units: {rng.randint(10, 9000)}."
    if t == 3:
        return "\n".join(f"#{rng.randint(1000, 99999)}\t{rng.choice(['Paid', 'Pending', 'Refunded'])}\t{rng.randint(1, 9)} items\t{date_only(rng)}" for _ in range(rng.randint(3, 6)))
    if t == 4:
        return f"Hi, I'm checking on order {amz} — the page says 'preparing for shipment' for {rng.randint(3, 10)} days now. Is there a delay at the warehouse?"
    return json.dumps({"order_number": f"#{rng.randint(100000000, 109999999)}", "external_ref": amz, "line_count": rng.randint(1, 12), "state": rng.choice(["open", "closed"])}, indent=2)


def ups_check(s):
    total = 0
    for i, ch in enumerate(s):
        v = int(ch) if ch.isdigit() else (ord(ch) - 63) % 10
        total += v * (2 if i % 2 else 1)
    return str((10 - total % 10) % 10)


def tracking(rng):
    k = rng.randrange(6)
    if k == 0:
        body = rstr(rng, 6, UPPER + DIGITS) + rng.choice(["01", "02", "03", "12", "13"]) + rstr(rng, 7, DIGITS)
        return "UPS", "1Z" + body + ups_check(body)
    if k == 1:
        d = rstr(rng, 11, DIGITS)
        w = [3, 1, 7]
        c = sum(int(x) * w[i % 3] for i, x in enumerate(reversed(d))) % 11 % 10
        return "FedEx", d + str(c)
    if k == 2:
        return "FedEx Ground", rdigits(rng, 15)
    if k == 3:
        body = rng.choice(["9400", "9205", "9261", "9270", "9300"]) + rstr(rng, rng.choice([17, 18]), DIGITS)
        return "USPS", body
    if k == 4:
        d = rstr(rng, 9, DIGITS)
        return "DHL Express", d + str(int(d) % 7)
    return "USPS", rng.choice(["EA", "EC", "LZ", "RA"]) + rstr(rng, 9, DIGITS) + "US"


def neg_tracking_number(rng):
    carrier, num = tracking(rng)
    t = rng.randrange(6)
    if t == 0:
        return f"Your package is on its way with {carrier}. Tracking number: {num}. Estimated delivery {date_only(rng)}."
    if t == 1:
        return json.dumps({"carrier": carrier.lower().replace(" ", "_"), "tracking_number": num, "status": rng.choice(["in_transit", "out_for_delivery", "delivered", "exception"]), "last_scan": iso_ts(rng)}, indent=2)
    if t == 2:
        return f"{iso_ts(rng)} INFO shipping: label created carrier={carrier.split()[0]} tracking_number={num} weight_g={rng.randint(100, 20000)} service={rng.choice(['ground', 'express', 'priority'])}"
    if t == 3:
        c2, n2 = tracking(rng)
        return f"The tracking number {num} ({carrier}) hasn't updated in {rng.randint(3, 9)} days; the replacement shipment has tracking number {n2} via {c2}."
    if t == 4:
        return f"| carrier | tracking number | status |\n|---|---|---|\n| {carrier} | {num} | {rng.choice(['Delivered', 'In transit', 'Label created'])} |"
    return f"Why does our regex for {carrier} tracking numbers reject {num}? It's a real label from today's pickup."


def isbn13(rng):
    body = rng.choice(["978", "979"]) + rstr(rng, 9, DIGITS)
    s = sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body))
    return body + str((10 - s % 10) % 10)


def isbn10(rng):
    body = rstr(rng, 9, DIGITS)
    s = sum(int(c) * (10 - i) for i, c in enumerate(body))
    c = (11 - s % 11) % 11
    return body + ("X" if c == 10 else str(c))


def hyphen_isbn(i):
    if len(i) == 13:
        return f"{i[:3]}-{i[3]}-{i[4:7]}-{i[7:12]}-{i[12]}"
    return f"{i[0]}-{i[1:4]}-{i[4:9]}-{i[9]}"


TITLES = ["Designing Data-Intensive Applications", "The Rust Programming Language", "Structure and Interpretation of Computer Programs",
          "Site Reliability Engineering", "Database Internals", "Programming Pearls", "The Art of Computer Programming, Vol. 1",
          "Crafting Interpreters", "Operating Systems: Three Easy Pieces", "Computer Networks", "Clean Architecture", "Refactoring"]


def neg_isbn(rng):
    t = rng.randrange(5)
    i13, i10 = isbn13(rng), isbn10(rng)
    if t == 0:
        return f"{rng.choice(TITLES)}. {rng.choice(['O’Reilly Media', 'No Starch Press', 'MIT Press', 'Addison-Wesley'])}, {rng.randint(1990, 2024)}. ISBN {hyphen_isbn(i13)}."
    if t == 1:
        return "isbn,title,format,price\n" + "\n".join(f"{isbn13(rng)},{rng.choice(TITLES)},{rng.choice(['paperback', 'hardcover', 'ebook'])},{rng.uniform(9, 80):.2f}" for _ in range(rng.randint(3, 6)))
    if t == 2:
        return f"ISBN-10: {i10}\nISBN-13: {hyphen_isbn(i13)}\nPages: {rng.randint(120, 1100)}\nEdition: {rng.randint(1, 5)}"
    if t == 3:
        return f"@book{{{rng.choice(WORDS)}{rng.randint(1990, 2024)},\n  title     = {{{rng.choice(TITLES)}}},\n  publisher = {{{rng.choice(['MIT Press', 'Springer', 'Pearson'])}}},\n  year      = {{{rng.randint(1990, 2024)}}},\n  isbn      = {{{i13}}}\n}}"
    return f"Why does our ISBN validator accept {hyphen_isbn(i10)} but reject {i13[:-1]}{(int(i13[-1]) + 1) % 10}? The check digit logic is in isbn.py."


def money(rng, big=False):
    v = rng.uniform(1, 10_000_000 if big else 50_000)
    return f"{v:,.2f}"


def neg_price_amount(rng):
    t = rng.randrange(6)
    if t == 0:
        return f"Subtotal: ${money(rng)}\nTax ({rng.choice([5, 7.25, 8.875, 20])}%): ${money(rng)}\nShipping: ${rng.uniform(0, 40):.2f}\nTotal: ${money(rng)}"
    if t == 1:
        eu = money(rng, True).replace(",", "X").replace(".", ",").replace("X", ".")
        return f"Umsatz Q{rng.randint(1, 4)}: EUR {eu} (Vorjahr: EUR {money(rng, True).replace(',', 'X').replace('.', ',').replace('X', '.')})"
    if t == 2:
        return f"| quarter | revenue | cost | margin |\n|---|---|---|---|\n" + "\n".join(f"| Q{q} {rng.randint(2021, 2025)} | ${money(rng, True)} | ${money(rng, True)} | {rng.uniform(5, 60):.1f}% |" for q in range(1, rng.randint(3, 5)))
    if t == 3:
        return f"Price changed from £{rng.uniform(1, 900):.2f} to £{rng.uniform(1, 900):.2f}; ¥{rng.randint(100, 900000):,} in the JP store and CHF {rng.randint(1, 9)}'{rng.randint(100, 999)}.{rng.randint(0, 99):02d} in CH."
    if t == 4:
        return json.dumps({"amount": rng.randint(100, 99999999), "currency": rng.choice(["usd", "eur", "jpy"]), "amount_decimal": f"{rng.uniform(1, 999999):.4f}", "fee": rng.randint(1, 9999)}, indent=2)
    return f"The budget for {rng.choice(['infra', 'marketing', 'R&D'])} is ${money(rng, True)} this year, up from ${money(rng, True)}; we spent ${money(rng)} on {rng.choice(['GPUs', 'egress', 'licenses'])} in {rng.choice(['March', 'April', 'May'])}."


def coord(rng):
    return round(rng.uniform(-60, 70), rng.choice([4, 5, 6])), round(rng.uniform(-179, 179), rng.choice([4, 5, 6]))


def neg_coordinates(rng):
    t = rng.randrange(6)
    lat, lon = coord(rng)
    if t == 0:
        return jdump(rng, {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]}, "properties": {"name": f"{rng.choice(WORDS).capitalize()} depot", "capacity": rng.randint(10, 900)}})
    if t == 1:
        return f"const center = {{ lat: {lat}, lng: {lon} }};\nmap.setView([center.lat, center.lng], {rng.randint(3, 18)});"
    if t == 2:
        pts = [coord(rng) for _ in range(rng.randint(3, 6))]
        return "lat,lon,elevation_m\n" + "\n".join(f"{a},{b},{rng.randint(0, 3000)}" for a, b in pts)
    if t == 3:
        return f"Geofence check failed for point ({lat}, {lon}): outside polygon {rng.choice(WORDS)}-zone by {rng.uniform(1, 900):.1f} m."
    if t == 4:
        d, m, s = rng.randint(0, 89), rng.randint(0, 59), rng.uniform(0, 59)
        return f"Station {rng.choice(WORDS).upper()}-{rng.randint(1, 99)}: {d}°{m}′{s:.1f}″N {rng.randint(0, 179)}°{rng.randint(0, 59)}′{rng.uniform(0, 59):.1f}″W, elevation {rng.randint(0, 4000)} m"
    return f"https://maps.example.net/?q={lat},{lon}&z={rng.randint(3, 18)} (bounding box {lat - 0.05:.4f},{lon - 0.05:.4f},{lat + 0.05:.4f},{lon + 0.05:.4f})"


def df_row(rng, dev, mnt):
    size = rng.randint(20, 2000)
    used = rng.randint(1, size)
    return f"/dev/{dev:<10} {size:>5}G {used:>5}G {size - used:>5}G {round(100 * used / size):>3}% /{mnt}"


def neg_durations_bytes_ports(rng):
    t = rng.randrange(7)
    if t == 0:
        return "\n".join(f"{ident(rng)}/{rng.choice([64, 1024, 65536])}  time:   [{rng.uniform(1, 900):.2f} µs {rng.uniform(1, 900):.2f} µs {rng.uniform(1, 900):.2f} µs]\n                        thrpt:  [{rng.uniform(1, 900):.2f} MiB/s]" for _ in range(rng.randint(1, 3)))
    if t == 1:
        return "Filesystem      Size  Used Avail Use% Mounted on\n" + "\n".join(df_row(rng, dev, mnt) for dev, mnt in list(zip(['nvme0n1p1', 'nvme1n1', 'sda1', 'xvdf'], ['', 'data', 'var/lib/docker', 'srv']))[: rng.randint(2, 4)])
    if t == 2:
        return f"transferred {rng.randint(10**9, 10**11)} bytes in {rng.uniform(1, 600):.1f}s ({rng.uniform(10, 900):.1f} MB/s), {rng.randint(1000, 900000)} objects, peak RSS {rng.randint(10**8, 10**9)} bytes"
    if t == 3:
        return f"BenchmarkEncode-8   \t{rng.randint(10000, 9000000)}\t      {rng.randint(100, 9000)} ns/op\t     {rng.randint(0, 4096)} B/op\t      {rng.randint(0, 40)} allocs/op\nPASS\nok  \tgithub.com/{rng.choice(WORDS)}/{rng.choice(SERVICES)}\t{rng.uniform(1, 30):.3f}s"
    if t == 4:
        return f"{svc(rng)} listening on 0.0.0.0:{rng.choice([8080, 9090, 3000, 5000, 50051])} (admin on 127.0.0.1:{rng.choice([9901, 15000, 8081])}), grpc on :{rng.choice([50051, 9000])}"
    if t == 5:
        return f"Benchmark 1: ./target/release/{svc(rng)} --input data.bin\n  Time (mean ± σ):     {rng.uniform(1, 900):.1f} ms ±  {rng.uniform(0.1, 20):.1f} ms\n  Range (min … max):   {rng.uniform(1, 900):.1f} ms … {rng.uniform(1, 900):.1f} ms    {rng.randint(10, 100)} runs"
    return f"Content-Length: {rng.randint(1, 10**9)}\nX-Response-Time: {rng.randint(1, 9000)}ms\nX-Upstream-Bytes: {rng.randint(10**6, 10**10)}\nKeep-Alive: timeout={rng.choice([5, 60])}, max={rng.choice([100, 1000])}"


def neg_http_status(rng):
    st = rng.choice([("200", "OK"), ("201", "Created"), ("204", "No Content"), ("301", "Moved Permanently"), ("304", "Not Modified"), ("400", "Bad Request"),
                     ("401", "Unauthorized"), ("403", "Forbidden"), ("404", "Not Found"), ("409", "Conflict"), ("429", "Too Many Requests"), ("500", "Internal Server Error"),
                     ("502", "Bad Gateway"), ("503", "Service Unavailable"), ("504", "Gateway Timeout")])
    t = rng.randrange(4)
    if t == 0:
        return f"HTTP/1.1 {st[0]} {st[1]}\nDate: {rng.choice(['Mon', 'Tue', 'Wed'])}, {rng.randint(1, 28):02d} Jun {rng.randint(2023, 2025)} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} GMT\nContent-Type: application/json\nContent-Length: {rng.randint(0, 9000)}\nx-request-id: {uuid4(rng)}\nserver: {rng.choice(['nginx/1.25.4', 'envoy', 'cloudflare'])}"
    if t == 1:
        return f"* Connected to {rng.choice(DOMAINS)} ({private_ipv4(rng)}) port 443\n> GET {rng.choice(HTTP_PATHS)} HTTP/2\n> Host: {rng.choice(DOMAINS)}\n> User-Agent: curl/8.5.0\n>\n< HTTP/2 {st[0]}\n< content-type: text/plain\n< cf-ray: {rhex(rng, 16)}-{rng.choice(['SJC', 'FRA', 'LHR', 'NRT'])}"
    if t == 2:
        return f"upstream returned {st[0]} {st[1]} after {rng.randint(1, 30000)} ms (retry {rng.randint(1, 3)}/3) url=http://{svc(rng)}:{rng.choice([8080, 9000])}{rng.choice(HTTP_PATHS)}"
    return f"HTTP/2 {st[0]}\nretry-after: {rng.randint(1, 120)}\nx-ratelimit-limit: {rng.choice([60, 600, 5000])}\nx-ratelimit-remaining: {rng.randint(0, 60)}\nx-ratelimit-reset: {epoch_s(rng)}"


def neg_k8s_resource(rng):
    t = rng.randrange(4)
    if t == 0:
        rows = [("NAME", "READY", "STATUS", "RESTARTS", "AGE")]
        for _ in range(rng.randint(3, 7)):
            r = rng.randint(0, 40)
            rows.append((f"{svc(rng)}-{k8s_suffix(rng)}", rng.choice(['1/1', '2/2', '0/1']), rng.choice(['Running', 'Running', 'Pending', 'CrashLoopBackOff', 'Completed']),
                         f"{r} ({rng.randint(1, 59)}m ago)" if r else "0", f"{rng.randint(1, 90)}d"))
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["   ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
        return "$ kubectl get pods -n " + rng.choice(ENVS) + "\n" + "\n".join(lines)
    if t == 1:
        return "LAST SEEN   TYPE      REASON      OBJECT                              MESSAGE\n" + "\n".join(
            f"{rng.randint(1, 59)}m         {rng.choice(['Warning', 'Normal'])}   {rng.choice(['BackOff', 'Pulled', 'Scheduled', 'Unhealthy', 'OOMKilled'])}   pod/{svc(rng)}-{k8s_suffix(rng)}   {rng.choice(['Back-off restarting failed container', 'Readiness probe failed: HTTP probe failed with statuscode: 503', 'Successfully assigned to ip-10-0-' + str(rng.randint(1, 250)) + '-' + str(rng.randint(1, 250)) + '.ec2.internal'])}" for _ in range(rng.randint(2, 5)))
    if t == 2:
        return f"NAME          TYPE           CLUSTER-IP      EXTERNAL-IP   PORT(S)          AGE\n{svc(rng)}   ClusterIP      10.{rng.randint(96, 111)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}   <none>        {rng.choice([80, 8080])}/TCP          {rng.randint(1, 400)}d\n{svc(rng)}   LoadBalancer   10.{rng.randint(96, 111)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}   {private_ipv4(rng)}   443:{rng.randint(30000, 32767)}/TCP    {rng.randint(1, 400)}d"
    s = svc(rng)
    return f"Name:         {s}-{k8s_suffix(rng)}\nNamespace:    {rng.choice(ENVS)}\nNode:         ip-10-0-{rng.randint(1, 250)}-{rng.randint(1, 250)}.{rng.choice(REGIONS)}.compute.internal/{private_ipv4(rng)}\nStatus:       Running\nIP:           {private_ipv4(rng)}\nControlled By:  ReplicaSet/{s}-{k8s_suffix(rng).split('-')[0]}\nContainers:\n  {s}:\n    Image:          registry.example.net/{s}:{semver(rng)}\n    Limits:  cpu: {rng.choice(['500m', '1', '2'])}  memory: {rng.choice([256, 512, 1024])}Mi"


def digest(rng):
    return "sha256:" + rhex(rng, 64)


def neg_docker_digest(rng):
    tags = {"nginx": ["1.25.4", "1.27-alpine", "stable"], "postgres": ["15.6", "16.3-bookworm", "16"], "redis": ["7.2.4", "7-alpine"],
            "python": ["3.11-slim", "3.12.3-bookworm"], "node": ["20-alpine", "22.2.0"], "alpine": ["3.19", "3.20"], "debian": ["bookworm-slim", "12.5"]}
    if rng.random() < 0.5:
        img = rng.choice(sorted(tags))
        tag = rng.choice(tags[img])
    else:
        img = f"ghcr.io/{rng.choice(WORDS)}/{svc(rng)}"
        tag = rng.choice(["latest", semver(rng, False), f"sha-{rhex(rng, 7)}"])
    t = rng.randrange(5)
    if t == 0:
        return f"$ docker pull {img}:{tag}\n{tag}: Pulling from {img.split('/')[-1] if '/' not in img else img.split('/', 1)[1]}\n{rhex(rng, 12)}: Pull complete\n{rhex(rng, 12)}: Pull complete\nDigest: {digest(rng)}\nStatus: Downloaded newer image for {img}:{tag}"
    if t == 1:
        return f"FROM {img}:{tag}@{digest(rng)}\nRUN echo pinned by digest"
    if t == 2:
        return "$ docker images --digests\nREPOSITORY   TAG   DIGEST   IMAGE ID   SIZE\n" + "\n".join(f"{img}   {rng.choice(tags.get(img, [semver(rng, False)]))}   {digest(rng)}   {rhex(rng, 12)}   {rng.randint(5, 900)}MB" for _ in range(rng.randint(2, 4)))
    if t == 3:
        return jdump(rng, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(rng), "size": rng.randint(400, 2000), "platform": {"architecture": a, "os": "linux"}} for a in ["amd64", "arm64"]]})
    return f"image: {img}@{digest(rng)}\nimagePullPolicy: IfNotPresent"


def luhn_id(rng):
    prefix = weighted(rng, [("1", 30), ("7", 15), ("8", 15), ("9", 15), (rng.choice(["20", "21", "31", "32", "33"]), 25)])
    n = rng.choice([13, 14, 15, 16, 17, 18, 19])
    return luhn_complete(prefix + rstr(rng, n - len(prefix) - 1, DIGITS))


def neg_luhn_id_log(rng):
    t = rng.randrange(6)
    if t == 0:
        return "\n".join(f"{iso_ts(rng)} INFO ledger: posted entry_id={luhn_id(rng)} batch={rng.randint(1, 999)} ok" for _ in range(rng.randint(2, 5)))
    if t == 1:
        return json.dumps({"snowflake_id": luhn_id(rng), "channel_id": luhn_id(rng), "kind": rng.choice(["message", "reaction", "thread"])}, indent=2)
    if t == 2:
        return f"span_id={luhn_id(rng)} parent={luhn_id(rng)} op={ident(rng)} dur={rng.randint(1, 9000)}us"
    if t == 3:
        return f"SELECT * FROM events WHERE event_id IN ({luhn_id(rng)}, {luhn_id(rng)}, {luhn_id(rng)});"
    if t == 4:
        return f"Kafka offset commit: partition={rng.randint(0, 63)} offset={luhn_id(rng)} group={svc(rng)}-consumer lag={rng.randint(0, 90000)}"
    return f"worker {rng.randint(1, 16)} claimed job {luhn_id(rng)} (sequence {luhn_id(rng)}) from queue {svc(rng)}"


def aws_acct(rng):
    return rng.choice(["123456789012", "111122223333", "444455556666"]) if rng.random() < 0.4 else rdigits(rng, 12)


def neg_aws_arn(rng):
    acct, region = aws_acct(rng), rng.choice(REGIONS)
    t = rng.randrange(6)
    if t == 0:
        return jdump(rng, {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": f"arn:aws:s3:::{rng.choice(WORDS)}-{rng.choice(['assets', 'logs'])}/*"},
                                                                   {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": f"arn:aws:sqs:{region}:{acct}:{svc(rng)}-queue"}]})
    if t == 1:
        return json.dumps({"UserId": "AROA" + rstr(rng, 17, UPPER + DIGITS) + ":" + svc(rng), "Account": acct, "Arn": f"arn:aws:sts::{acct}:assumed-role/{rng.choice(['deploy', 'ReadOnly', 'ci-runner'])}/{svc(rng)}"}, indent=4)
    if t == 2:
        return f"arn:aws:lambda:{region}:{acct}:function:{svc(rng)}-{rng.choice(ENVS)}\narn:aws:iam::{acct}:role/{svc(rng)}-exec\narn:aws:logs:{region}:{acct}:log-group:/aws/lambda/{svc(rng)}:*"
    if t == 3:
        return f"https://sqs.{region}.amazonaws.com/{acct}/{svc(rng)}-{rng.choice(['dlq', 'events', 'jobs'])}"
    if t == 4:
        return f"docker push {acct}.dkr.ecr.{region}.amazonaws.com/{svc(rng)}:{semver(rng, False)}"
    return f"Outputs:\n  ClusterArn: arn:aws:ecs:{region}:{acct}:cluster/{rng.choice(ENVS)}\n  TopicArn: arn:aws:sns:{region}:{acct}:{svc(rng)}-alerts\n  BucketArn: arn:aws:s3:::{rng.choice(WORDS)}-{acct}-artifacts"


AWS_DOC_SECRETS = ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"]


def neg_docs_example_key(rng):
    i = rng.randrange(2)
    key, secret = DOC_AWS_KEYS[i], AWS_DOC_SECRETS[i]
    region = rng.choice(REGIONS)
    t = rng.randrange(11)
    if t == 7:
        return f"// Example from the SDK for Java developer guide\nAwsBasicCredentials creds = AwsBasicCredentials.create(\n    \"{key}\",\n    \"{secret}\");\nS3Client s3 = S3Client.builder().region(Region.of(\"{region}\")).credentialsProvider(StaticCredentialsProvider.create(creds)).build();"
    if t == 8:
        return f"// docs snippet - replace the placeholder values\nconst client = new S3Client({{\n  region: \"{region}\",\n  credentials: {{ accessKeyId: \"{key}\", secretAccessKey: \"{secret}\" }},\n}});"
    if t == 9:
        return f"docker run --rm \\\n  -e AWS_ACCESS_KEY_ID={key} \\\n  -e AWS_SECRET_ACCESS_KEY={secret} \\\n  amazon/aws-cli s3 ls   # the README's example values"
    if t == 10:
        return f"GetSessionToken returns temporary credentials; in the API reference sample response the access key id is {key} and the expiration is 2011-07-11T19:55:29.611Z."
    if t == 0:
        return f"$ aws configure\nAWS Access Key ID [None]: {key}\nAWS Secret Access Key [None]: {secret}\nDefault region name [None]: {region}\nDefault output format [None]: json"
    if t == 1:
        return f"The following example shows a credentials file with a default profile (from the AWS CLI user guide):\n\n[default]\naws_access_key_id={key}\naws_secret_access_key={secret}"
    if t == 2:
        return f"Linux or macOS:\n$ export AWS_ACCESS_KEY_ID={key}\n$ export AWS_SECRET_ACCESS_KEY={secret}\n$ export AWS_DEFAULT_REGION={region}"
    if t == 3:
        return f"Authorization: AWS4-HMAC-SHA256 Credential={key}/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature={rhex(rng, 64)}\n(example from the Signature Version 4 documentation)"
    if t == 4:
        return f"In the docs, access keys look like `{key}` and secret keys like `{secret}`. These are placeholders — never use real keys in tickets."
    if t == 5:
        return f"https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={key}%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature={rhex(rng, 64)}"
    return f"# test fixture: AWS documentation example credentials, not real\nAWS_ACCESS_KEY_ID = \"{key}\"\nAWS_SECRET_ACCESS_KEY = \"{secret}\"\nmoto.mock_aws()"


def test_card(rng):
    c = rng.choice(TEST_CARDS)
    k = rng.randrange(3)
    if k == 0 or len(c) not in (15, 16):
        return c
    if len(c) == 15:
        return group(c, [4, 6, 5], " ")
    return group(c, [4, 4, 4, 4], rng.choice([" ", "-"]))


def neg_test_card_docs(rng):
    t = rng.randrange(7)
    c1, c2 = test_card(rng), test_card(rng)
    if t == 0:
        return f"Use Stripe's test card {c1} with any future expiry date and any 3-digit CVC. To simulate a decline, use {c2}."
    if t == 1:
        return f"cy.get('[data-test=card-number]').type('{only_digits(c1)}');\ncy.get('[data-test=card-expiry]').type('12/34');\ncy.get('[data-test=card-cvc]').type('123');"
    if t == 2:
        return "| Brand | Test number |\n|---|---|\n" + "\n".join(f"| {b} | {c} |" for b, c in zip(["Visa", "Mastercard", "Amex", "Discover"], [test_card(rng) for _ in range(4)]))
    if t == 3:
        return f"@pytest.fixture\ndef test_card():\n    # sandbox-only number from the gateway docs\n    return {{\"number\": \"{only_digits(c1)}\", \"exp_month\": 12, \"exp_year\": 2034, \"cvc\": \"314\"}}"
    if t == 4:
        return f"In sandbox mode, the payment gateway accepts the documented test PANs such as {c1} and {c2}; real cards are rejected."
    if t == 5:
        return f"TEST_CARDS = [\n" + "".join(f"    \"{only_digits(test_card(rng))}\",\n" for _ in range(rng.randint(3, 6))) + "]  # from the processor's testing docs"
    return f"Reproduce: open checkout in test mode, enter {c1}, expiry 04/30, CVC 123, then click Pay. Expected: 3DS challenge. Actual: spinner forever."


NEGATIVE_CATEGORIES = [
    ("code_rust", neg_code_rust), ("code_python", neg_code_python), ("code_js_ts", neg_code_js_ts), ("code_go", neg_code_go),
    ("code_java", neg_code_java), ("code_c", neg_code_c), ("code_sql", neg_code_sql), ("code_shell", neg_code_shell),
    ("config_yaml", neg_config_yaml), ("dockerfile", neg_dockerfile), ("stacktrace_python", neg_stacktrace_python),
    ("stacktrace_java", neg_stacktrace_java), ("stacktrace_node", neg_stacktrace_node), ("panic_rust", neg_panic_rust),
    ("json_api_payload", neg_json_api_payload), ("access_log", neg_access_log), ("app_log", neg_app_log),
    ("sql_result", neg_sql_result), ("csv_rows", neg_csv_rows), ("uuid", neg_uuid), ("hex_hash", neg_hex_hash),
    ("base64_blob", neg_base64_blob), ("git_log", neg_git_log), ("unix_timestamp", neg_unix_timestamp),
    ("iso_datetime", neg_iso_datetime), ("ip_address", neg_ip_address), ("version_string", neg_version_string),
    ("order_number", neg_order_number), ("tracking_number", neg_tracking_number), ("isbn", neg_isbn),
    ("price_amount", neg_price_amount), ("coordinates", neg_coordinates), ("durations_bytes_ports", neg_durations_bytes_ports),
    ("http_status", neg_http_status), ("k8s_resource", neg_k8s_resource), ("docker_digest", neg_docker_digest),
    ("luhn_id_log", neg_luhn_id_log), ("aws_arn", neg_aws_arn), ("docs_example_key", neg_docs_example_key),
    ("test_card_docs", neg_test_card_docs),
]
PER_CATEGORY = 36


def build_negatives(report):
    rows = []
    for category, gen in NEGATIVE_CATEGORIES:
        rng = stream("negative/" + category)
        seen = set()
        rejected = Counter()
        while len(seen) < PER_CATEGORY:
            text = gen(rng)
            # Short snippets travel in twos or threes, as pasted lines do.
            while len(text) < 80 or (len(text) < 160 and rng.random() < 0.4):
                text += "\n" + gen(rng)
            problems = negative_problems(category, text)
            if len(text) > 1500:
                problems.append("too long")
            if problems or text in seen:
                for p in problems or ["duplicate"]:
                    rejected[p] += 1
                if sum(rejected.values()) > 20 * PER_CATEGORY:
                    raise SystemExit(f"{category}: too many rejected candidates: {rejected.most_common(5)}")
                continue
            seen.add(text)
            rows.append({"category": category, "text": text})
        report[category] = rejected
    return rows


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    neg_report, pos_report = {}, {}
    negatives = build_negatives(neg_report)
    positives = build_positives(pos_report)
    write_jsonl(os.path.join(HERE, "negatives.jsonl"), negatives)
    write_jsonl(os.path.join(HERE, "positives.jsonl"), positives)

    print(f"negatives.jsonl: {len(negatives)} lines")
    for category, n in Counter(r["category"] for r in negatives).items():
        print(f"  {category:<24} {n}")
    print(f"positives.jsonl: {len(positives)} lines")
    for kind, n in Counter(r["kind"] for r in positives).items():
        print(f"  {kind:<24} {n}")
    invalid = pos_report.get("phone", Counter()).get("phonenumbers", 0)
    if phonenumbers is None:
        print("phonenumbers is not installed: phone positives were not checked with it")
    elif invalid:
        print(f"WARNING: phonenumbers rejected {invalid} phone candidates; the output now differs from "
              "a run without phonenumbers. Tighten PHONE_PLANS until this is 0.", file=sys.stderr)
    else:
        print(f"phonenumbers {phonenumbers.__version__}: every phone positive is a valid number")


if __name__ == "__main__":
    main()
