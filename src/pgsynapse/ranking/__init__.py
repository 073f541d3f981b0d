"""Second-stage rankers (issue 20): the vector search's top candidates ordered again by a cross-encoder.

- :mod:`.registry`: the ranker registry (``pgsynapse.ranker_models``), routed, promoted and rolled back like
  the other models;
- :mod:`.scorer`: a loaded ranker scoring (question, passage) pairs, on ONNX Runtime INT8 or torch;
- :mod:`.export`: a trained cross-encoder to ONNX INT8, with the agreement check;
- :mod:`.train`: ``pgsynapse ranker train``'s trainer process (pairs, hard negatives, the gate's evaluation).
"""
