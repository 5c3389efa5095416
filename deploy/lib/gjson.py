"""The subset of GJSON paths (github.com/tidwall/gjson, what KEDA's
metrics-api scaler reads `valueLocation` with) that the chart renders:
keys separated by '.', with '\\' escaping a special character inside a key
(model names may hold dots). Anything else (wildcards, queries, modifiers)
is refused rather than guessed at.
"""

SPECIAL = set("*?#|@!=<>%")


def split(path):
    """Returns the keys of PATH, unescaped; raises ValueError on what this subset does not read."""
    keys, key, escaped = [], "", False
    for ch in path:
        if escaped:
            key += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ".":
            keys.append(key)
            key = ""
        elif ch in SPECIAL:
            raise ValueError(f"GJSON path {path!r}: unescaped {ch!r} is a wildcard, query or modifier")
        else:
            key += ch
    if escaped:
        raise ValueError(f"GJSON path {path!r} ends in a lone backslash")
    keys.append(key)
    if any(k == "" for k in keys):
        raise ValueError(f"GJSON path {path!r} has an empty key")
    return keys


def get(doc, path):
    """The value PATH selects in DOC (parsed JSON); raises KeyError when it selects nothing."""
    value = doc
    for key in split(path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise KeyError(f"GJSON path {path!r}: no {key!r} in {str(value)[:200]}")
    return value


if __name__ == "__main__":
    # Self-test, run by deploy/check.
    doc = {"models": {"sd1.5": {"queued": 3}, "sdxl": {"queued": 0}}, "queued": 3}
    assert get(doc, "models.sd1\\.5.queued") == 3
    assert get(doc, "models.sdxl.queued") == 0
    for bad in ("models.sd1.5.queued", "models.sdxl.running"):
        try:
            get(doc, bad)
            raise AssertionError(f"{bad} selected something")
        except KeyError:
            pass
    try:
        split("models.*.queued")
        raise AssertionError("a wildcard was read")
    except ValueError:
        pass
    print("ok   GJSON subset self-test")
