"""Files and volumes: what is read, checked and written.

CT and mask reading with orientation (:mod:`.volumes`), header and completeness checks
before a file is read (:mod:`.checks`), checkpoints (:mod:`.checkpoint`), case pairing
in folders (:mod:`.cases`), output folders written all or nothing (:mod:`.outputs`) and
the synthetic CT generator (:mod:`.synthetic`). Imports the method, never the running
or Slicer parts.
"""
