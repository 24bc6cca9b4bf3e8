"""Running a detection: from files to files, one case or a folder, here or on Ray.

The volume pipeline (:mod:`.pipeline`), the single files-to-files path (:mod:`.runner`),
the ``gdpi`` engine commands (:mod:`.cli`, :mod:`.demo`), progress and streaming
(:mod:`.progress`), signals (:mod:`.signals`), devices (:mod:`.devices`), the
background-process wrapper used by Slicer (:mod:`.worker`), cross-case batch packing
(:mod:`.packing`) and the Ray engine (:mod:`.ray_engine`). Imports files and method,
never the Slicer side.
"""
