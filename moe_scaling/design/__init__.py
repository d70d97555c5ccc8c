"""On-device design: the budget search (:mod:`.search`) and full-size model folders (:mod:`.builder`)."""
