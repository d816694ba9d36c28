"""Applications above the library: ``cam`` (``python -m gapjax.cam``: maps of photos or of a
trained run) and ``wsol`` (``python -m gapjax.wsol``: saved score maps against a benchmark).

The top floor: these modules may import any of gapjax and nothing in gapjax imports them
(the library's ``__main__`` entry points hand over by name). A user error ends a command
with one line on stderr and exit status 1 (``--traceback`` shows the traceback instead).
"""
