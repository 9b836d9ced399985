"""Using trained models on images: reconstructions, predictions, and both on whole large images.

* :mod:`.reconstruct` -- :func:`~.reconstruct.reconstruct`: mask an image letterboxed to a
  pretrained model's size, reconstruct it, and score the masked pixels against the
  visible-mean baseline (MSE / PSNR); :func:`~.reconstruct.model_from_checkpoint`.
* :mod:`.predict` -- a fine-tuned classifier's class probabilities and spatial map, or a
  dense head's per-class probability maps (:func:`~.predict.load_predictor`).
* :mod:`.tiled_reconstruct`, :mod:`.tiled_predict` -- the same over a whole pyramid level,
  tile by tile, streamed band by band into OME-Zarr multiscale maps (memory: one band).
* :mod:`.tiling` -- the overlapping, blended tiling both tiled forms run on.

Submodules are imported on demand (they need torch); this package imports nothing.
"""
