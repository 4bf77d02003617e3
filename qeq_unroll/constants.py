"""Physical constants in the units of the package (eV, Å, e)."""

#: Coulomb constant k_e = e²/(4πε₀) in eV·Å/e² (CODATA).
COULOMB_CONSTANT = 14.399645
#: The value LAMMPS hard-codes in its QEq fixes, for parity runs.
LAMMPS_COULOMB_CONSTANT = 14.4
