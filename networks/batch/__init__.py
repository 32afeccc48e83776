"""Batch inference with any bundle of this repository: the engine behind ``tools/infer.py``.

* :mod:`~networks.batch.core`: the bundle read once (:class:`~networks.batch.core.BundleSpec`, which says its kind),
  options, results, the one summary, the network loader (PyTorch or ONNX Runtime);
* :mod:`~networks.batch.volumes`: NIfTI/DICOM discovery, header checks, the volume segmenter, the plan, one case;
* :mod:`~networks.batch.images`: 2D discovery, the predictor base, the classifier and the 2D segmenter;
* :mod:`~networks.batch.writers` and :mod:`~networks.batch.dicom_seg`: every output, written atomically;
* :mod:`~networks.batch.engines` (in-process) and :mod:`~networks.batch.ray_engine`: where a planned case runs;
* :mod:`~networks.batch.runners`: one runner per kind and :func:`~networks.batch.runners.run`, the whole job as one
  function (``run(bundle_dir, input, output_dir, **options)`` -> exit code).

Imports go one way, in that order; ``docs/architecture.md`` draws it. This file imports nothing, so importing one
module does not load the others.
"""
