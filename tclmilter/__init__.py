"""The Tcl side of pytclmilter (pkgIndex.tcl, tclmilter.tcl, examples), shipped as package data."""
