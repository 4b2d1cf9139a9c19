"""Changes that, in a Keras pull request, would be edits to Keras's files.

Each module here is the companion of one existing Keras file and names it in
its docstring; each function here names the upstream function it stands for.
Upstreaming this project means moving these bodies into those files.
`distribution_graft.COMPANIONS` says which Keras module triggers which
companion, and `internals` lists every Keras internal this project relies
on, with the Keras versions it was checked against.
"""
