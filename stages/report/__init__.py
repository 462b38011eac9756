"""Reports: pictures of matches (:mod:`.draw`) and matching a user's own image pair (:mod:`.match_pair`)."""
