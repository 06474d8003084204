"""A labelled PII set: generated positives (seeded) + hand-written hard cases, and negatives that must stay
untouched (code, version strings, dates, times, ISBNs, UUIDs, hashes, decimals).

``positive_cases(seed)`` -> list of (kind, value, text): ``text`` holds ``value`` once, and the scrubbed
text must equal ``text.replace(value, placeholder)`` exactly (so boundaries are checked too).
``NEGATIVES`` + ``negative_cases(seed)`` -> texts the scrubber must return unchanged.

The generators compute check digits with their own code (Luhn, ISO 13616 mod 97 by the standard's
piecewise method), independent of parallax.data.prep.pii; the published test numbers and example IBANs
below check both against outside references.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid

# Published test card numbers (Stripe / PayPal / Adyen documentation): all Luhn-valid.
PUBLISHED_CARDS = [
    "4111111111111111", "4012888888881881", "4222222222222", "5555555555554444", "5105105105105100",
    "2223003122003222", "378282246310005", "371449635398431", "6011111111111117", "6011000990139424",
    "30569309025904", "38520000023237", "3530111333300000", "3566002020360505", "6200000000000005",
]
# Example IBANs published by the banks' associations / the IBAN registry (as printed, with spaces).
PUBLISHED_IBANS = [
    "GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00", "FR14 2004 1010 0505 0001 3M02 606",
    "NL91 ABNA 0417 1643 00", "BE68 5390 0754 7034", "CH93 0076 2011 6238 5295 7",
    "IT60 X054 2811 1010 0000 0123 456", "ES91 2100 0418 4502 0005 1332", "NO93 8601 1117 947",
    "AT61 1904 3002 3457 3201", "PL61 1090 1014 0000 0712 1981 2874", "SE45 5000 0000 0583 9825 7466",
    "MT84 MALT 0110 0001 2345 MTLC AST0 01S", "LC55 HEMM 0001 0001 0012 0012 0002 3015",
]

TEMPLATES = [
    "Contact: {}.", "Please write to {} today.", "{} (primary)", "My details are: {}, ok?",
    "Line one\n{}\nLine three", '"{}"', "see [{}] below", "Value={} ;", "{}", "Sent from {}\n\nThanks!",
]


def _luhn_digit(body: str) -> str:
    """The check digit that makes body + digit Luhn-valid (doubling every second digit from the right
    of the full number, i.e. the last digit of ``body`` is doubled)."""
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return str((10 - total % 10) % 10)


def _iban_check(cc: str, bban: str) -> str:
    """ISO 13616 check digits: 98 - (BBAN + CC + "00" as a number mod 97), computed piecewise (the
    remainder so far followed by the next 7 digits), as the standard describes."""
    digits = "".join(str(ord(c) - 55) if c.isalpha() else c for c in bban + cc + "00")
    rem = 0
    for i in range(0, len(digits), 7):
        rem = int(str(rem) + digits[i:i + 7]) % 97
    return f"{98 - rem:02d}"


# (country, BBAN layout: n = digit, a = capital, c = alphanumeric), lengths per the IBAN registry.
_IBAN_LAYOUTS = [
    ("DE", "n" * 18), ("GB", "aaaa" + "n" * 14), ("FR", "n" * 10 + "c" * 11 + "nn"), ("NL", "aaaa" + "n" * 10),
    ("ES", "n" * 20), ("IT", "a" + "n" * 10 + "c" * 12), ("BE", "n" * 12), ("CH", "n" * 5 + "c" * 12),
    ("AT", "n" * 16), ("PL", "n" * 24), ("SE", "n" * 20), ("NO", "n" * 11), ("IE", "aaaa" + "n" * 14),
    ("PT", "n" * 21), ("DK", "n" * 14), ("FI", "n" * 14), ("LU", "nnn" + "c" * 13), ("SA", "nn" + "c" * 18),
]


def _fill(rng: random.Random, layout: str) -> str:
    pools = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}
    return "".join(rng.choice(pools[k]) for k in layout)


def _gen_iban(rng: random.Random) -> str:
    cc, layout = rng.choice(_IBAN_LAYOUTS)
    bban = _fill(rng, layout)
    iban = cc + _iban_check(cc, bban) + bban
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


_CARD_BRANDS = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
                ("6011", 16), ("65", 16), ("36", 14), ("3528", 16), ("62", 16), ("62", 19), ("4", 19)]


def _gen_card(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_BRANDS)
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    num = body + _luhn_digit(body)
    style = rng.randrange(3)
    if style == 0 or length not in (15, 16):
        return num
    sep = " " if style == 1 else "-"
    groups = [num[:4], num[4:10], num[10:]] if length == 15 else [num[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


def _d(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _gen_phone(rng: random.Random) -> str:
    area = str(rng.randint(2, 9)) + _d(rng, 2)
    fmts = [
        lambda: f"({area}) {_d(rng, 3)}-{_d(rng, 4)}",
        lambda: f"{area}-{_d(rng, 3)}-{_d(rng, 4)}",
        lambda: f"{area}.{_d(rng, 3)}.{_d(rng, 4)}",
        lambda: f"{area} {_d(rng, 3)} {_d(rng, 4)}",
        lambda: f"1-{area}-{_d(rng, 3)}-{_d(rng, 4)}",
        lambda: f"+1 ({area}) {_d(rng, 3)}-{_d(rng, 4)}",
        lambda: f"+1 {area} {_d(rng, 3)} {_d(rng, 4)}",
        lambda: f"+44 20 {_d(rng, 4)} {_d(rng, 4)}",
        lambda: f"+44 7{_d(rng, 3)} {_d(rng, 6)}",
        lambda: f"+49 30 {_d(rng, 7)}",
        lambda: f"+49 (0)30 {_d(rng, 8)}",
        lambda: f"+4915{_d(rng, 9)}",
        lambda: f"+33 6 {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
        lambda: f"+81-3-{_d(rng, 4)}-{_d(rng, 4)}",
        lambda: f"+91 {rng.randint(7, 9)}{_d(rng, 4)} {_d(rng, 5)}",
        lambda: f"020 {_d(rng, 4)} {_d(rng, 4)}",
        lambda: f"030 {_d(rng, 7)}",
        lambda: f"0{rng.randint(1, 9)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
        lambda: f"(0{_d(rng, 3)}) {_d(rng, 3)} {_d(rng, 4)}",
    ]
    return rng.choice(fmts)()


def _gen_ip(rng: random.Random) -> str:
    import ipaddress

    r = rng.random()
    if r < 0.5:
        return ".".join(str(rng.randint(0, 255)) for _ in range(4))
    groups = [rng.randrange(1, 65536) for _ in range(8)]
    if r < 0.7:
        return ":".join(f"{g:04x}" for g in groups)
    if r < 0.9:
        start, run = rng.randrange(0, 6), rng.randint(2, 5)
        for i in range(start, min(8, start + run)):
            groups[i] = 0
        addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)).compressed
        return addr
    return f"::ffff:{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


_FIRST = ["jane", "john", "maria", "li", "ahmed", "olga", "pat", "sam", "noor", "ken"]
_LAST = ["doe", "smith", "garcia", "wang", "khan", "ivanova", "o-neil", "lee", "ali", "sato"]
_DOMAINS = ["example.com", "mail.example.org", "uni-bonn.de", "company.co.uk", "startup.io", "gov.fr",
            "dept.university.edu", "shop.online", "x.ai", "post.ch"]


def _gen_email(rng: random.Random) -> str:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = rng.choice([f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first}_{last}", f"{first}+news",
                        f"{first[0]}{last}", f"{first}.{last}-{rng.randint(1, 9)}", f"{first.upper()}.{last}"])
    return f"{local}@{rng.choice(_DOMAINS)}"


_B62 = string.ascii_letters + string.digits


def _r(rng: random.Random, n: int, pool: str = _B62) -> str:
    return "".join(rng.choice(pool) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _gen_secret(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return "AKIA" + _r(rng, 16, string.ascii_uppercase + string.digits)
    if kind == 1:
        return rng.choice(["ghp_", "gho_", "ghs_"]) + _r(rng, 36)
    if kind == 2:
        return "github_pat_" + _r(rng, 22) + "_" + _r(rng, 59)
    if kind == 3:
        return f"xox{rng.choice('bpa')}-{_d(rng, 12)}-{_d(rng, 13)}-{_r(rng, 24)}"
    if kind == 4:
        return rng.choice(["sk-", "sk-proj-", "sk-ant-api03-"]) + _r(rng, 48, _B62 + "-_")
    if kind == 5:
        return "AIza" + _r(rng, 35, _B62 + "-_")
    if kind == 6:
        return rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _r(rng, 24)
    if kind == 7:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps({"sub": _d(rng, 10), "name": rng.choice(_FIRST), "iat": int(_d(rng, 9))}).encode())
        return f"{header}.{payload}.{_b64url(rng.randbytes(32))}"
    label = rng.choice(["RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", ""])
    body = "\n".join(_r(rng, 64, _B62 + "+/") for _ in range(rng.randint(2, 6)))
    return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----"


GENERATORS = {"email": _gen_email, "phone": _gen_phone, "ip": _gen_ip, "credit_card": _gen_card,
              "iban": _gen_iban, "secret": _gen_secret}

# Hand-written hard cases: (kind, value, text).
HARD_POSITIVES = [
    ("email", "first.last+tag@sub.example.co.uk", "mailto:first.last+tag@sub.example.co.uk"),
    ("email", "a_b-c@x-y.org", "<a_b-c@x-y.org>"),
    ("email", "JOHN.DOE@EXAMPLE.COM", "From: JOHN.DOE@EXAMPLE.COM\n"),
    ("email", "u@d.io", "(u@d.io)"),
    ("ip", "8.8.8.8", "DNS at 8.8.8.8, fallback"),
    ("ip", "255.255.255.255", "mask 255.255.255.255."),
    ("ip", "2001:db8::1", "http://[2001:db8::1]:8080/"),
    ("ip", "fe80::1ff:fe23:4567:890a", "link-local fe80::1ff:fe23:4567:890a%eth0"),
    ("ip", "::ffff:192.0.2.128", "mapped ::ffff:192.0.2.128 here"),
    ("ip", "10.0.0.1", "host=10.0.0.1:5432"),
    ("phone", "+1 (555) 123-4567", "Call +1 (555) 123-4567."),
    ("phone", "555-123-4567", "cell: 555-123-4567"),
    ("phone", "+44 20 7946 0958", "London office +44 20 7946 0958!"),
    ("phone", "06 12 34 56 78", "portable 06 12 34 56 78"),
    ("phone", "1-800-555-0199", "toll-free 1-800-555-0199"),
    ("credit_card", "4111 1111 1111 1111", "card 4111 1111 1111 1111 exp 12/27"),
    ("credit_card", "3782-822463-10005", "amex 3782-822463-10005."),
    ("credit_card", "5555555555554444", "MC:5555555555554444"),
    ("iban", "DE89 3704 0044 0532 0130 00", "IBAN DE89 3704 0044 0532 0130 00 EUR 100"),
    ("iban", "GB82WEST12345698765432", "(GB82WEST12345698765432)"),
    ("secret", "AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE"),
    ("secret", "ghp_" + "a1B2" * 9, 'token: "ghp_' + "a1B2" * 9 + '"'),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----",
     "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----\nend"),
    ("secret", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACBf",
     "truncated: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACBf"),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17\n\nMIIEpAIBAAK\n",
     "cut short -----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17\n\nMIIEpAIBAAK\n"
     "and the rest of the post is prose, kept."),
    ("email", "o'brien@example.ie", "write to o'brien@example.ie"),
    ("email", "john@example.com", "user = User(name='john@example.com')"),
    ("ip", "192.168.0.1", "subnet 192.168.0.1/24 gateway"),
    ("phone", "+1-202-555-0143", "[+1-202-555-0143](#contact)"),
    ("secret", "sk-ant-api03-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "ANTHROPIC_API_KEY=sk-ant-api03-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
]
HARD_POSITIVES += [("credit_card", n, f"number {n} on file") for n in PUBLISHED_CARDS]
HARD_POSITIVES += [("iban", i, f"pay to {i} please") for i in PUBLISHED_IBANS]


def positive_cases(seed: int = 0, per_kind: int = 150) -> list[tuple[str, str, str]]:
    """``per_kind`` generated cases per kind (seeded), then the hand-written ones."""
    rng = random.Random(seed)
    cases = []
    for kind, gen in GENERATORS.items():
        for _ in range(per_kind):
            value = gen(rng)
            cases.append((kind, value, rng.choice(TEMPLATES).format(value)))
    return cases + HARD_POSITIVES


NEGATIVES = [
    # code
    "@property\ndef size(self) -> int:\n    return self._n",
    "y = w@x.T + b; z = a@b.mean(axis=0); q = w@x.shape",
    "std::vector<int> v; std::map<std::string, int> m; a::b::c();",
    "use std::collections::HashMap;\nlet x = arr[1..10];",
    "evens = xs[::2]; tail = xs[1000::2000]; rev = s[::-1]",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 3.14159; }",
    "SELECT id, name FROM users WHERE created_at > '2023-01-15 10:30:00' LIMIT 100;",
    "f'{value:.2f}' and '{:>10}'.format(x); re.compile(r'\\d{3}-\\d{4}')",
    "color: #ff00aa; margin: 0 0 12px 4px; font: 14px/1.5 sans-serif;",
    "git checkout a94a8fe5ccb19ba61c4c0873d391e987982fbbd3 && git log -1 3f2a1b9",
    "git clone git@github.com:org/repo.git",
    "pip install numpy==1.26.4 torch>=2.11 'pkg@1.2.3'",
    "FROM python:3.11-slim\nRUN apt-get install -y curl=7.88.1-10+deb12u5",
    "<img src=\"icon@2x.png\"> @media (max-width: 600px) { .a { b: c } }",
    "x = np.zeros((1024, 768)); y = x.reshape(-1, 3, 256)",
    "const risk = task-based-scheduler-with-retries; // sk-learn-compatible-estimators-everywhere",
    "mac 00:1A:2B:3C:4D:5E and ::1 loopback; ratio 16:9:4",
    # version strings
    "version 1.2.3.4", "Version: 10.0.0.1", "v1.2.3.4", "release 4.3.2.1", "build 1.0.0.12", "Python 3.11.7",
    "firmware 2.4.1.0", "Windows 10.0.19041.1", "Chrome 120.0.6099.109", "libfoo-1.2.3-beta.4", "see section 1.2.3.4",
    # dates and times
    "2023-01-15", "15/01/2023", "01.02.2023", "on 12/31/1999 at 23:59", "2024-03-10T14:30:00Z",
    "2024-03-10 14:30:00.123456+01:00", "20240310", "10:30", "10:30:45", "23:59:59.999", "1:02:03:04",
    "Jan 5, 2024 - Feb 6, 2025", "Q3 2023", "1999-12-31 23:59:59",
    # ISBN-like
    "ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "978-0-306-40615-7", "9780306406157", "ISBN 0306406152",
    "ISSN 0317-8471",
    # numbers
    "3.141592653589793", "-0.000123", "1,234,567.89", "6.02214076e23", "pi ~ 3.14159265358979323846",
    "12 345 678 people", "1234567890", "timestamp 1700000000000", "order #4111111111111112", "ID 9876543210123",
    "Decimal('+35236450.6'), '+000000120', x = +12345678.25, +1234567",
    "Call 911 or ext. 1234", "A4 paper, ISO 8601, US20230123456A1, NASA", "AKIA is a prefix; eyJ alone; xox",
]


def negative_cases(seed: int = 0, n: int = 100) -> list[str]:
    """Generated negatives: UUIDs, git hashes, decimals, dates and times, versions, ISBNs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = uuid.UUID(int=rng.getrandbits(128), version=4)
        isbn12 = "978" + _d(rng, 9)
        isbn_check = (10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(isbn12)) % 10) % 10
        out += [
            str(u), str(u).upper(), f"commit {rng.randbytes(20).hex()}", f"sha256:{rng.randbytes(32).hex()}",
            f"{rng.uniform(-1e6, 1e6):.6f}", f"{rng.random():.15f}",
            f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
            f"version {rng.randint(0, 20)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
            f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
            f"ISBN {isbn12}{isbn_check}",
        ]
    return out
