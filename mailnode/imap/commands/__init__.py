"""Every IMAP command the node answers, declared once: name, the states it is valid in, its
handler, the capability it brings and its RFC. The session dispatches through TABLE, and the
CAPABILITY list and the `command` metric labels are derived from it (mailnode.imap.table).
mailnode.imap.server gives TABLE to each session.

The handlers live in one module per area, as mox's imapserver splits them: auth, folders, fetch,
search, sort (SORT and THREAD), store (STORE, COPY, MOVE, EXPUNGE, APPEND) and idle.
"""

from __future__ import annotations

from mailnode.imap import table
from mailnode.imap.commands import auth, fetch, folders, idle, search, sort, store
from mailnode.imap.session import Session
from mailnode.imap.table import ANY_STATE, AUTHENTICATED, NOT_AUTHENTICATED, SELECTED, Extension, When

Command = table.Command[Session]

TABLE: table.Table[Session] = table.Table(
    extensions=(
        Extension("IMAP4rev1", "RFC 3501"),
        # RFC 9051, advertised beside IMAP4rev1 (§1.2): a session speaks it once the client sends ENABLE IMAP4rev2
        # (mailnode.imap.commands.auth); it takes in these extensions, each declared in this table (RFC 9051
        # Appendix E; LITERAL+ is a superset of its LITERAL-, RFC 7888 §5; CHILDREN is LIST-EXTENDED's).
        Extension("IMAP4rev2", "RFC 9051", includes=(
            "LITERAL+", "NAMESPACE", "UNSELECT", "UIDPLUS", "ESEARCH", "SEARCHRES", "ENABLE", "IDLE", "SASL-IR",
            "LIST-EXTENDED", "LIST-STATUS", "MOVE", "BINARY", "SPECIAL-USE", "STATUS=SIZE", "CHILDREN",
        )),
        Extension("LITERAL+", "RFC 7888"),  # framed by the session
        Extension("SASL-IR", "RFC 4959"),  # AUTHENTICATE's initial response
        Extension("CHILDREN", "RFC 3348"),  # LIST's \HasChildren and \HasNoChildren
        Extension("SPECIAL-USE", "RFC 6154"),  # LIST's \Sent, \Drafts... and the SPECIAL-USE selection
        Extension("LIST-EXTENDED", "RFC 5258"),  # LIST's selection and return options (basic)
        Extension("CONDSTORE", "RFC 7162"),  # MODSEQ in FETCH, STORE, SEARCH, SELECT and STATUS
        Extension("QRESYNC", "RFC 7162 §3.2"),  # ENABLE QRESYNC, SELECT (QRESYNC ...), VANISHED
        Extension("ESEARCH", "RFC 4731"),  # SEARCH RETURN (MIN MAX COUNT ALL)
        Extension("SEARCHRES", "RFC 5182"),  # SEARCH RETURN (SAVE) and `$`
        Extension("LIST-STATUS", "RFC 5819"),  # LIST's RETURN (STATUS (...))
        Extension("STATUS=SIZE", "RFC 8438"),  # STATUS's SIZE item
        Extension("BINARY", "RFC 3516"),  # FETCH BINARY[], BINARY.SIZE[] and APPEND's literal8
        Extension("THREAD=REFERENCES", "RFC 5256 §3"),  # THREAD's second algorithm (mailnode.imap.sort)
        Extension("LOGINDISABLED", "RFC 3501 §6.2.3", When.LOGIN_DISABLED),
    ),
    commands=(
        # auth: the connection and the login
        Command("CAPABILITY", ANY_STATE, auth.capability, "RFC 3501 §6.1.1"),
        Command("LOGOUT", ANY_STATE, auth.logout, "RFC 3501 §6.1.3"),
        Command("ID", ANY_STATE, auth.id_, "RFC 2971", "ID"),
        Command("STARTTLS", NOT_AUTHENTICATED, auth.starttls, "RFC 3501 §6.2.1", "STARTTLS", When.STARTTLS_OFFERED),
        Command("LOGIN", NOT_AUTHENTICATED, auth.login, "RFC 3501 §6.2.3"),
        Command("AUTHENTICATE", NOT_AUTHENTICATED, auth.authenticate, "RFC 3501 §6.2.2, RFC 4616", "AUTH=PLAIN",
                When.LOGIN_ALLOWED),
        Command("ENABLE", AUTHENTICATED, auth.enable, "RFC 5161", "ENABLE"),
        Command("NAMESPACE", AUTHENTICATED, auth.namespace, "RFC 2342", "NAMESPACE"),
        # idle: waiting for and asking about changes
        Command("NOOP", ANY_STATE, idle.noop, "RFC 3501 §6.1.2"),
        Command("CHECK", SELECTED, idle.noop, "RFC 3501 §6.4.1"),
        Command("IDLE", AUTHENTICATED, idle.idle, "RFC 2177", "IDLE"),
        # folders
        Command("SELECT", AUTHENTICATED, folders.select, "RFC 3501 §6.3.1"),
        Command("EXAMINE", AUTHENTICATED, folders.select, "RFC 3501 §6.3.2"),
        Command("CREATE", AUTHENTICATED, folders.create, "RFC 3501 §6.3.3"),
        Command("DELETE", AUTHENTICATED, folders.delete, "RFC 3501 §6.3.4"),
        Command("RENAME", AUTHENTICATED, folders.rename, "RFC 3501 §6.3.5"),
        Command("SUBSCRIBE", AUTHENTICATED, folders.subscribe, "RFC 3501 §6.3.6"),
        Command("UNSUBSCRIBE", AUTHENTICATED, folders.subscribe, "RFC 3501 §6.3.7"),
        Command("LIST", AUTHENTICATED, folders.list_, "RFC 3501 §6.3.8, RFC 5258"),
        Command("LSUB", AUTHENTICATED, folders.list_, "RFC 3501 §6.3.9"),
        Command("STATUS", AUTHENTICATED, folders.status, "RFC 3501 §6.3.10"),
        Command("GETQUOTA", AUTHENTICATED, folders.getquota, "RFC 2087 §4.2", "QUOTA"),
        Command("GETQUOTAROOT", AUTHENTICATED, folders.getquotaroot, "RFC 2087 §4.3", "QUOTA"),
        Command("SETQUOTA", AUTHENTICATED, folders.setquota, "RFC 2087 §4.1", "QUOTA"),
        Command("CLOSE", SELECTED, folders.close, "RFC 3501 §6.4.2"),
        Command("UNSELECT", SELECTED, folders.unselect, "RFC 3691", "UNSELECT"),
        # fetch and search
        Command("FETCH", SELECTED, fetch.fetch, "RFC 3501 §6.4.5"),
        Command("UID FETCH", SELECTED, fetch.fetch, "RFC 3501 §6.4.8"),
        Command("SEARCH", SELECTED, search.search_, "RFC 3501 §6.4.4"),
        Command("UID SEARCH", SELECTED, search.search_, "RFC 3501 §6.4.8"),
        Command("SORT", SELECTED, sort.sort_, "RFC 5256 §3", "SORT"),
        Command("UID SORT", SELECTED, sort.sort_, "RFC 5256 §3", "SORT"),
        Command("THREAD", SELECTED, sort.thread, "RFC 5256 §3", "THREAD=ORDEREDSUBJECT"),
        Command("UID THREAD", SELECTED, sort.thread, "RFC 5256 §3", "THREAD=ORDEREDSUBJECT"),
        # store: changing messages
        Command("APPEND", AUTHENTICATED, store.append, "RFC 3501 §6.3.11"),
        Command("STORE", SELECTED, store.store, "RFC 3501 §6.4.6"),
        Command("UID STORE", SELECTED, store.store, "RFC 3501 §6.4.8"),
        Command("COPY", SELECTED, store.copy, "RFC 3501 §6.4.7"),
        Command("UID COPY", SELECTED, store.copy, "RFC 3501 §6.4.8"),
        Command("MOVE", SELECTED, store.copy, "RFC 6851", "MOVE"),
        Command("UID MOVE", SELECTED, store.copy, "RFC 6851", "MOVE"),
        Command("EXPUNGE", SELECTED, store.expunge, "RFC 3501 §6.4.3"),
        Command("UID EXPUNGE", SELECTED, store.expunge, "RFC 4315 §2.1", "UIDPLUS"),  # with APPENDUID, COPYUID
    ),
)  # fmt: skip
