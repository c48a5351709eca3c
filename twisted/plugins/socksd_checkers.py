"""The ``htpasswd:`` checker for ``--auth`` and the config's ``checkers``."""

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(ICheckerFactory, IPlugin)
class HashedPasswordFileFactory:
    authType = "htpasswd"
    authHelp = (
        "A file of user:hash lines with bcrypt ($2y$/$2b$, as `htpasswd -B` "
        "writes) or argon2 hashes, re-read on each login. "
        "Add or change entries with `python -m socksd.auth.passwd --file PATH USER`."
    )
    argStringFormat = "A path to the file."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str):
        from socksd.auth.passwd import HashedPasswordFile

        return HashedPasswordFile(argstring)


htpasswd = HashedPasswordFileFactory()
