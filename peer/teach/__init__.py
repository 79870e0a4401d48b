"""Teacher peers: a frozen Hugging Face model serving sparse soft targets (``model``,
``server``), and a trainer's side of them: routing, spot checks and bans (``client``, ``trust``)."""
