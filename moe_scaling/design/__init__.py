"""On-device design: from a fitted law and a budget to a model folder.

* :mod:`.space`: :class:`~.space.Budget`, :class:`~.space.ArchSpace`, trunks, layouts and the exact
  costs of every expert count on one trunk and layout (:func:`~.space.expert_line`);
* :mod:`.candidate`: the typed hand-offs, :class:`~.candidate.Candidate` (a described
  architecture; ``to_dict`` / ``from_dict`` are the ``moe-fit --json`` sweet spot) and
  :class:`~.candidate.FrontierPoint`;
* :mod:`.search`: the sweet-spot search (:func:`~.search.search` -> :class:`~.search.SearchResult`);
* :mod:`.report`: Markdown tables of search results;
* :mod:`.builder`: model folders (:func:`~.builder.build`, :func:`~.builder.build_from_fit`,
  :func:`~.builder.config_from_spec`).
"""
