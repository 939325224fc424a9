"""Caption metrics through `pycocoevalcap`, the COCO caption evaluation's reference code: BLEU-1..4 (Papineni et al.
2002), METEOR (Denkowski & Lavie 2014), ROUGE-L (Lin 2004) and CIDEr-D (Vedantam et al. 2015; pycocoevalcap's
`Cider` is the CIDEr-D variant: clipped counts and a length penalty, sigma 6).

`full=True` (the final report) tokenizes with its PTB tokenizer and adds METEOR: both are Java programs (Debian:
`apt-get install default-jre-headless`); without Java they are skipped and said so. `full=False` (validation
during training) tokenizes with our own normaliser (lower case, words and punctuation apart), the same captions
the model is trained on, and scores BLEU, ROUGE-L and CIDEr-D in pure Python: no JVM start per evaluation.
SPICE needs Stanford CoreNLP's jars, which pycocoevalcap downloads on first use: it cannot run offline, so it is
not computed.
"""

from __future__ import annotations

import contextlib
import io
import shutil

from ...data.captioning.words import normalise


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(references: dict[int, list[str]], candidates: dict[int, str], full: bool = False
                   ) -> tuple[dict[str, float], list[str]]:
    """Corpus scores of `candidates` (one caption per id) against `references` (several per id), and notes (what
    could not be computed). Keys: bleu1..bleu4, rouge_l, cider (and meteor with full=True and Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(candidates)
    if not ids:
        return {}, ["no captions to score"]
    notes = []
    java = full and java_available()
    if full and not java:
        notes.append("java not found: tokenized without PTB, METEOR skipped (apt-get install default-jre-headless)")
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
            res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    else:
        gts = {i: [normalise(c) for c in references[i]] for i in ids}
        res = {i: [normalise(candidates[i])] for i in ids}
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            del meteor  # its __del__ ends the JVM
    if full:
        notes.append("SPICE not computed: it needs Stanford CoreNLP jars that pycocoevalcap downloads on first use, "
                     "and this runs offline")
    return scores, notes
