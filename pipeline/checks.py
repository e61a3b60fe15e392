"""Data checks on a finished cache: the images it left out, and exact duplicates.

Byte-identical images in two splits inflate test accuracy (the head has seen the
answer), and identical images with different labels cap it. Both are found from
the content hash stored per row, without opening an image:

    with FeatureCache(path) as cache:
        checks = data_checks(cache)   # JSON-ready: counts, the groups, the skipped ids
    print(note(checks))               # one line for the terminal, "" when all is clean
"""
import numpy as np

LIMIT = 200  # groups and skipped ids listed; the counts are always complete


def duplicate_groups(ids, sha256, labels, split, class_names):
    """Groups of two or more rows with the same content hash -> [{"sha256", "ids", "labels", "splits"}]."""
    sha256 = np.asarray(sha256)
    known = np.flatnonzero(sha256 != "")
    if len(known) == 0:
        return []
    _, inverse, counts = np.unique(sha256[known], return_inverse=True, return_counts=True)
    members = np.split(known[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])  # rows per hash
    groups = []
    for rows in (members[g] for g in np.flatnonzero(counts > 1)):
        groups.append({"sha256": str(sha256[rows[0]]), "ids": [str(ids[r]) for r in rows],
                       "labels": [class_names[labels[r]] for r in rows], "splits": [str(split[r]) for r in rows]})
    return groups


def data_checks(cache, limit=LIMIT):
    """What a report shows about a cache's data: skipped images and duplicate groups. Only the rows that
    may share a hash are read as strings, so a cache of millions of rows costs a few bytes a row."""
    rows = cache.rows_sharing_content()
    groups = duplicate_groups(cache.ids_of(rows), cache.sha256_of(rows), cache.labels[rows], cache.split[rows],
                              cache.class_names)
    for g in groups:
        g["across_splits"], g["conflicting_labels"] = len(set(g["splits"])) > 1, len(set(g["labels"])) > 1
    train = {g["sha256"] for g in groups if "train" in g["splits"]}
    seen_in_train = sum(s != "train" for g in groups if g["sha256"] in train for s in g["splits"])
    skipped = cache.skipped
    return {"n_skipped": len(skipped), "skipped": [{"id": i, "reason": r} for i, r in skipped[:limit]],
            "n_duplicate_groups": len(groups), "n_duplicate_images": sum(len(g["ids"]) for g in groups),
            "n_groups_across_splits": sum(g["across_splits"] for g in groups),
            "n_groups_conflicting_labels": sum(g["conflicting_labels"] for g in groups),
            "n_eval_images_seen_in_train": seen_in_train,
            "groups": [g for g in groups if g["across_splits"] or g["conflicting_labels"]][:limit]}


def summary(checks):
    """One line for the terminal, or "" when there is nothing to say."""
    parts = []
    if checks["n_skipped"]:
        parts.append(f"{count(checks['n_skipped'], 'image')} skipped")
    groups, seen = checks["n_groups_across_splits"], checks["n_eval_images_seen_in_train"]
    if groups:
        span = f"{count(groups, 'duplicate group')} {'spans' if groups == 1 else 'span'} splits"
        parts.append(f"{count(seen, 'val/test image')} {'is' if seen == 1 else 'are'} byte-identical to train "
                     f"images ({span})" if seen else f"val and test share byte-identical images ({span})")
    conflicting = checks["n_groups_conflicting_labels"]
    if conflicting:
        parts.append(f"{count(conflicting, 'duplicate group')} {'has' if conflicting == 1 else 'have'} "
                     "conflicting labels")
    return "; ".join(parts)


def count(n, noun):
    """'1 image', '2 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def note(checks):
    """The line the terminal shows after extract and train-head, or "" when there is nothing to say."""
    found = summary(checks)
    if not found:
        return ""
    leaks = checks["n_groups_across_splits"] or checks["n_groups_conflicting_labels"]
    return (f"note: {found}; `make report` lists them"
            + (", `make extract DROP_DUPLICATES=1` leaves duplicates out" if leaks else ""))
