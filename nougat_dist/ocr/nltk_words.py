"""nltk's `words` corpus: nougat's markdown postprocessing reads it, and its presence changes
the output text, so it is checked once per job instead of once per page."""

from __future__ import annotations

import contextlib
import io
import logging
import socket

log = logging.getLogger(__name__)


def ensure_nltk_words() -> bool:
    """Make sure nltk's `words` corpus (read by nougat's markdown postprocessing) is present.

    Its presence changes the output text, and when it is missing nougat calls nltk.download once
    per page. So: check once, try one download, and if that fails too, warn once and turn later
    download attempts into no-ops (the text is then what the CLI writes offline).
    """
    import nltk

    try:
        nltk.data.find("corpora/words")
        return True
    except LookupError:
        pass
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            ok = bool(nltk.download("words", quiet=True, raise_on_error=False))
    except OSError:
        ok = False
    finally:
        socket.setdefaulttimeout(old)
    log.debug("nltk.download('words'): %s", noise.getvalue().strip())
    if ok:
        try:
            nltk.data.find("corpora/words")
            return True
        except LookupError:
            pass
    log.warning("nltk 'words' corpus is missing and could not be downloaded: nougat's markdown "
                "postprocessing will add a space after every page's last word. Install it with "
                "`python -m nltk.downloader words` (or set NLTK_DATA) for the exact stock output.")
    return False


def _silence_nltk_download() -> None:
    import nltk

    nltk.download = lambda *a, **k: False  # type: ignore[assignment]

