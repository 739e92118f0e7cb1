"""Changing a whole model: find and wrap target layers (``inject``), adapter groups (``groups``),
merge / unmerge / disable / count (``ops``), what an adapter is (``description``) and putting a
loaded one in place (``place``). The only floor that performs model surgery; it reads no files."""
