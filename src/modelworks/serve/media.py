"""Answers as files: a predictor whose answer can also be a file (one generated image) offers
`media(response) -> (bytes, media type) | None`; the server sends that file instead of the JSON envelope when the
request's Accept header names its media type exactly (`Accept: image/png`). JSON stays the default: a client that
accepts anything (`*/*`, or no Accept header) gets the envelope with its model, version and latency."""

from __future__ import annotations


def accepted_types(accept: str) -> set[str]:
    """The media types an Accept header names, parameters (q=...) dropped, wildcards kept as written."""
    return {part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()}


def negotiate(predictor, response, accept: str | None) -> tuple[bytes, str] | None:
    """(body, media type) when the predictor offers this answer as a file of a type the client named, else None."""
    offer = getattr(predictor, "media", None)
    if not accept or not callable(offer):
        return None
    media = offer(response)
    if media is None or media[1].lower() not in accepted_types(accept):
        return None
    return media
