"""Built-in word list for synthetic scenes: common English words, sign/brand-like words and numbers.

Every entry is 2-12 characters of printable ASCII, so Pillow's built-in font can draw it too.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _split(*lines: str) -> tuple[str, ...]:
    return tuple(w for line in lines for w in line.split())


COMMON_WORDS: tuple[str, ...] = _split(
    "about above after again air all also always animal answer apple area around art baby back bake bank beach bear",
    "beauty become bed before begin best better big bird black blue board boat body book both bread break bridge",
    "bright bring brother brown build burn business busy buy cake call camera can car care carry case cat center",
    "chair change check child choose city class clean clear clock close cloud coast coffee cold color come company",
    "corner country cover cream cross cup dance dark day deep dinner direct doctor dog door down draw dream dress",
    "drink drive early earth east easy eat egg energy enjoy enough enter evening every exit face fact fair fall",
    "family farm fast father feel field fill film find fine fire first fish floor flower fly follow food foot",
    "forest forget fresh friend front fruit full game garden gate gift girl give glass gold good great green ground",
    "group grow hair half hand happy hard head health hear heart heavy help here high hill history hold home hope",
    "horse hot hotel hour house idea island job join juice just keep key kind king kitchen know lake land large",
    "last late laugh learn leave left less letter life light like line lion list listen little live local long look",
    "love low lunch machine magic main make market matter meet memory milk mind minute modern money month moon",
    "morning mother mountain move music name nature near need never new news next night north note now number ocean",
    "offer office often old only open orange order other outside over page paint paper park party pass past peace",
    "people person photo piano picture place plan plant play please point power press price print problem public",
    "pull push quick quiet radio rain read ready real red remember rest rice right river road rock room round rule",
    "run safe salt same save school science sea season second seed sell send service shape share shop short show",
    "side sign simple sing sister size sky sleep slow small smile snow soft song soon sound south space speak",
    "special spring square stand star start station stay step stone stop store story street strong student study",
    "summer sun sweet table take talk taste tea teacher team tell thank think ticket time today together town train",
    "travel tree true turn under until up use valley value very view village visit voice wait walk wall warm wash",
    "watch water way weather week welcome west white wild window winter wish wood word work world write yellow",
    "young zone",
)

SIGN_WORDS: tuple[str, ...] = _split(
    "OPEN CLOSED SALE EXIT STOP PUSH PULL ENTRANCE PARKING TAXI HOTEL CAFE BAR BAKERY PHARMACY POLICE DANGER",
    "CAUTION NOTICE WELCOME FREE WIFI MENU PIZZA BURGER SUSHI NOODLES GROCERY MARKET CINEMA THEATER MUSEUM LIBRARY",
    "GARAGE MOTEL DINER DELI FLORIST BOOKS RECORDS VINTAGE OUTLET MALL PLAZA Starlight Sunrise Bluebird Redwood",
    "Northway Silverline Greenleaf Goldfish Moonbeam Riverside Lakeview Hilltop Oakwood Pinecrest Maplewood",
    "Brightway Topline Nexus Zenith Apex Nova Orbit Vertex Quantum Pixel Echo Atlas Summit Harbor Beacon Lumen",
    "Vista Solstice Horizon Cobalt Velvet Crimson",
)

_NUMBER_PATTERNS = ("{n}", "No{n}", "{n}AM", "{n}PM", "Route{n}", "{n}km", "{n}th", "Gate{n}", "{n}min", "{y}")


def sample_number(rng: np.random.Generator) -> str:
    """A number-like word: a plain number, a year, or a number with a short prefix/suffix."""
    pattern = _NUMBER_PATTERNS[int(rng.integers(len(_NUMBER_PATTERNS)))]
    return pattern.format(n=int(rng.integers(1, 1000)), y=int(rng.integers(1950, 2031)))


def _recase(word: str, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.4:
        return word.lower()
    if u < 0.75:
        return word[:1].upper() + word[1:].lower()
    return word.upper()


@lru_cache(maxsize=64)
def _pool(name: str, min_len: int, max_len: int) -> tuple[str, ...]:
    words = COMMON_WORDS if name == "common" else SIGN_WORDS
    return tuple(w for w in words if min_len <= len(w) <= max_len)


def sample_word(rng: np.random.Generator, min_len: int = 2, max_len: int = 12) -> str:
    """A random word (70% common, 20% sign/brand, 10% numbers), mixed case, ``min_len``..``max_len`` characters."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    u = rng.random()
    pool = _pool("common" if u < 0.7 else "sign", min_len, max_len) if u < 0.9 else ()
    if pool:
        word = pool[int(rng.integers(len(pool)))]
        return _recase(word, rng) if u < 0.7 or rng.random() < 0.3 else word
    for _ in range(20):
        word = sample_number(rng)
        if min_len <= len(word) <= max_len:
            return word
    digits = min(max_len, max(min_len, 4))
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))
