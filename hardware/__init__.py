"""Radio interfaces: sound cards, PTT keyers, squelch (COR) detectors.

Imported as ``gateway.hardware``; depends on ``gateway.codecs`` only, never on the engine.
"""
