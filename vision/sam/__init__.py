"""Segment Anything (Kirillov et al. 2023).

* ``model``: ``Sam`` (image encoder + prompt encoder + mask decoder), ``PRESETS``
  (``sam-vit-b``/``-l``/``-h``, ``sam-tiny``), ``from_preset``, the image transforms;
* ``image_encoder``, ``prompt_encoder``, ``mask_decoder``: the three parts;
* ``predictor``: ``SamPredictor`` (embed an image once, answer prompts);
* ``automatic``: ``AutomaticMaskGenerator`` (masks for a grid of points, filtered);
* ``convert``: the original ``.pth`` checkpoints and Hugging Face ``SamModel`` -> our variables;
* ``losses``: focal + dice mask loss, IoU loss, the simulated interactive prompts.
"""
