"""``foundation report RUN``: one self-contained HTML page (and its plots as PNGs) of a run folder."""
