"""The seeing tools: each records the function as ``fb.grad`` does, with an observer
attached to the sweeps, and reports what it saw.

* :mod:`.explain` (the model) with :mod:`.explanation` (text, DOT, SVG, HTML),
  :mod:`.explain_format` and :mod:`.explain_layout`: ``fb.explain``.
* :mod:`.tags` (``fb.tag``, ``fb.grad_and_intermediates``) and :mod:`.perturb`
  (tags inside loop, branch and checkpoint bodies); :mod:`.flow` builds on them.
* :mod:`.checked` (the NaN/Inf watch) and :mod:`.nonfinite` (its report):
  ``fb.checked_grad``.
* :mod:`.residuals` (``fb.saved_residuals``), :mod:`.memory_plan`
  (``fb.memory_plan``), :mod:`.health`, :mod:`.gradcheck`; :mod:`.common` holds
  what they share.
"""
