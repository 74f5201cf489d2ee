"""``supercharge keygen``, ``sign`` and ``verify``: minisign-compatible keys and signatures.

Why these exist when ``minisign`` does: the same commands ship with the tool
that needs them (prepare-initrd, container processing), take keys from the
environment for automation, and report failures in the project's one-line,
exit-code style.  The files they read and write are minisign's, so the two tools
can be mixed freely (docs/trust.md).

``add_parsers`` adds the three subcommands to the main parser; each command
function takes the parsed arguments and returns an exit code (0 good, 1 a
signature failed, 2 bad input, raised as :class:`UserError`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EXIT_FAILED, EXIT_OK, UserError

SECRET_KEY_NAME = "supercharge.key"
PUBLIC_KEY_NAME = "supercharge.pub"


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen``, ``sign`` and ``verify`` to the ``supercharge`` command's subparsers."""
    keygen = subparsers.add_parser(
        "keygen", help="make a signing key pair (minisign format)",
        description="Write supercharge.key (secret, mode 0600, encrypted with a passphrase) and "
                    "supercharge.pub (public). The passphrase comes from SUPERCHARGE_SIGN_PASSPHRASE, "
                    "or is asked twice on the terminal.")
    keygen.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                        help="where to write the key pair (default: the current directory)")
    keygen.add_argument("--unencrypted", action="store_true",
                        help="store the secret key without a passphrase (like minisign -W)")
    keygen.add_argument("-f", "--force", action="store_true", help="overwrite an existing key pair")
    keygen.set_defaults(func=cmd_keygen)

    sign = subparsers.add_parser(
        "sign", help="sign files, writing FILE.minisig (minisign format)",
        description="Sign each FILE into FILE.minisig. The key comes from -k or SUPERCHARGE_SIGN_KEY "
                    "(the key's text or a path); its passphrase from SUPERCHARGE_SIGN_PASSPHRASE or "
                    "the terminal.")
    sign.add_argument("files", nargs="+", metavar="FILE")
    sign.add_argument("-k", "--key", metavar="SECKEY", help="secret key file (default: $SUPERCHARGE_SIGN_KEY)")
    sign.add_argument("-t", "--trusted-comment", metavar="COMMENT",
                      help="signed one-line comment (default: timestamp:<unix>\\tfile:<name>\\thashed)")
    sign.add_argument("-c", "--untrusted-comment", metavar="COMMENT", help="unsigned one-line comment")
    sign.add_argument("-x", "--signature", metavar="SIG", help="signature file (one FILE only)")
    sign.add_argument("--legacy", action="store_true",
                      help="sign the file itself, not its BLAKE2b-512 digest (like minisign -l)")
    sign.set_defaults(func=cmd_sign)

    verify = subparsers.add_parser(
        "verify", help="verify FILE.minisig signatures against trusted public keys",
        description="Exit 0 when every FILE carries a valid signature by one of the keys, 1 when a "
                    "signature fails (each failure named on stderr), 2 for bad input.")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument("-p", "--pubkey", action="append", required=True, metavar="PUBKEY",
                        help="trusted public key file, or a directory of *.pub (repeatable: rotation)")
    verify.add_argument("-x", "--signature", metavar="SIG", help="signature file (one FILE only)")
    verify.add_argument("-H", "--require-prehashed", action="store_true",
                        help="refuse legacy (non-prehashed) signatures, like minisign -H")
    verify.add_argument("-q", "--quiet", action="store_true", help="print nothing for good signatures")
    verify.set_defaults(func=cmd_verify)


def _existing_files(files: list[str]) -> list[Path]:
    """All FILE arguments as paths, after checking each is a readable regular file (bad input otherwise)."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: file not found")
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
    return paths


def cmd_keygen(args: argparse.Namespace) -> int:
    from .keys import ask_passphrase, generate_keypair, passphrase_from_environment, write_atomically

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a directory")
    if not out.exists():
        try:
            out.mkdir(mode=0o700, parents=True)   # a new key directory is private, as ~/.ssh is
        except OSError as exc:
            raise UserError(f"{out}: cannot create the key directory: {exc.strerror}") from None
    secret_path, public_path = out / SECRET_KEY_NAME, out / PUBLIC_KEY_NAME
    if not args.force:
        for path in (secret_path, public_path):
            if path.exists():
                raise UserError(f"{path}: already exists; pass --force to overwrite the key pair")
    if args.unencrypted:
        passphrase = None
    else:
        passphrase = passphrase_from_environment()
        if passphrase is None:
            if not sys.stdin.isatty():
                raise UserError("a passphrase is needed for the secret key: set SUPERCHARGE_SIGN_PASSPHRASE, "
                                "run on a terminal, or pass --unencrypted")
            passphrase = ask_passphrase("Passphrase for the new secret key: ", confirm=True)
    secret_text, public_text = generate_keypair(passphrase, unencrypted=args.unencrypted)
    try:
        write_atomically(secret_path, secret_text.encode("ascii"), mode=0o600)
        write_atomically(public_path, public_text.encode("ascii"), mode=0o644)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the key pair: {exc.strerror or exc}") from None
    from guest_init.trust import PublicKey

    public = PublicKey.from_string(public_text, source=str(public_path))
    print(f"secret key {secret_path}{' (unencrypted)' if passphrase is None else ''}")
    print(f"public key {public_path}")
    print(f"key id     {public.key_id_hex}")
    print(f"verify with: supercharge verify FILE -p {public_path}   or   "
          f"minisign -Vm FILE -P {public.to_base64()}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from .keys import sign_file, signing_key, write_signature

    if args.signature and len(args.files) != 1:
        raise UserError("-x/--signature names one signature file, so give exactly one FILE")
    paths = _existing_files(args.files)
    key = signing_key(args.key)
    for path in paths:
        text = sign_file(path, key, trusted_comment=args.trusted_comment, prehash=not args.legacy,
                         untrusted_comment=args.untrusted_comment)
        target = write_signature(path, text, args.signature)
        print(f"{path}: signed by key {key.key_id_hex}{' (legacy)' if args.legacy else ''} -> {target}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from guest_init.trust import KeyFormatError, SignatureError, load_trusted_keys, verify_file

    if args.signature and len(args.files) != 1:
        raise UserError("-x/--signature names one signature file, so give exactly one FILE")
    for pub in args.pubkey:
        if not os.path.exists(pub):
            raise UserError(f"{pub}: public key file not found")
    try:
        keys = load_trusted_keys(args.pubkey)
    except KeyFormatError as exc:
        raise UserError(str(exc)) from None
    paths = _existing_files(args.files)
    failed = 0
    for path in paths:
        try:
            result = verify_file(path, args.signature, keys, require_prehashed=args.require_prehashed)
        except SignatureError as exc:
            failed += 1
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            print(f"supercharge: {message}", file=sys.stderr)
            continue
        if not args.quiet:
            mode = "prehashed" if result.prehashed else "legacy"
            print(f"{path}: OK, signed by key {result.key_id} ({mode}); trusted comment: "
                  f"{result.trusted_comment}")
    return EXIT_FAILED if failed else EXIT_OK
