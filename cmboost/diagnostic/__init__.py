"""The judge-free diagnostic of a joint network: the measures (accuracy, realness, alignment), the PAG
picture (pag), its report (report), and the diagnose verb (diagnose)."""
