"""Download: fetch sources over HTTP(S) with mirrors, resume and checks, extract them safely into ``raw/``."""
