# vilseg's runtime additions on top of mmseg's default_runtime: import vilseg's registered modules, load
# checkpoints weights-only with an allowlist and save them atomically (SafeCheckpointHook), and store the message hub as plain data so that
# `--resume` works under torch >= 2.6, and save the random states so that a resumed run continues bit-identically.
custom_imports = dict(imports=['vilseg.models', 'vilseg.engine'], allow_failed_imports=False)
custom_hooks = [dict(type='SafeCheckpointHook'), dict(type='PlainMessageHubHook'), dict(type='RandomStateHook')]
