"""Choosing how to boost one generator: the candidates and their checks (candidates), scoring and choosing
on one half and confirming on the other (choose), the table (table), and the tune verb (tune)."""
