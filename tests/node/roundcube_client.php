<?php
// A real webmail's IMAP client against the node: Roundcube's own protocol library (rcube_imap_generic, from
// Debian's roundcube-core, unpacked by scripts/bootstrap) doing what Roundcube does when the server
// advertises the extensions: SORT, THREAD=REFERENCES, SEARCH RETURN (ESEARCH), STATUS SIZE (STATUS=SIZE),
// FETCH BINARY[] and QRESYNC (ENABLE, SELECT ... (QRESYNC ...), UID FETCH ... (CHANGEDSINCE VANISHED)). Driven by tests/node/test_imap_roundcube.py: reads one JSON request on stdin, connects
// (STARTTLS, the certificate verified), runs the request's step, and prints one JSON object: what the
// library returned, and the command lines it sent (its debug transcript), so the test can tell the
// extension was used.

declare(strict_types=1);

$request = json_decode(stream_get_contents(STDIN), true, 16, JSON_THROW_ON_ERROR);
require_once $request['lib'] . '/Roundcube/bootstrap.php';  // its helpers and class autoloader, as Roundcube starts

$sent = [];
$imap = new rcube_imap_generic();
$imap->setDebug(true, function ($imap, string $message) use (&$sent): void {
    if (preg_match('/^(?:\[[^\]]*\] )?C: (.*)$/s', $message, $match)) {  // "[resource id] C: <line>"
        $sent[] = $match[1];
    }
});
$connected = $imap->connect('127.0.0.1', $request['user'], $request['password'], [
    'port' => $request['port'],
    'ssl_mode' => 'tls',  // STARTTLS
    'timeout' => 120,
    'socket_options' => ['ssl' => ['cafile' => $request['cafile'], 'peer_name' => 'localhost']],
]);
if (!$connected) {
    fwrite(STDERR, "connect failed: " . $imap->error . "\n");
    exit(1);
}

function uids(rcube_result_index $result): array
{
    return array_map('intval', $result->get());
}

$out = ['capabilities' => []];
foreach (['SORT', 'THREAD', 'ESEARCH', 'LIST-STATUS', 'BINARY', 'QRESYNC', 'CONDSTORE', 'STATUS'] as $name) {
    $out['capabilities'][$name] = $imap->getCapability($name);
}
$folder = $request['folder'];

switch ($request['step']) {
    case 'browse':
        // The message list: sorted by date, newest first, as Roundcube shows it (rcube_imap::list_messages).
        $sorted = $imap->sort($folder, 'DATE', 'ALL', true);
        $out['sorted_by_date'] = uids($sorted);
        $out['sorted_by_subject'] = uids($imap->sort($folder, 'SUBJECT', 'ALL', true));
        $out['sorted_by_size_unseen'] = uids($imap->sort($folder, 'SIZE', 'UNSEEN', true));
        // The threaded list (rcube_imap::threads): the tree of UIDs, the list in display order, the threads.
        $threads = $imap->thread($folder, 'REFERENCES', '', true);
        $out['thread_tree'] = $threads->get_tree();
        $out['thread_order'] = array_map('intval', $threads->get());
        $out['thread_count'] = $threads->count();
        // Counting and the unseen list (rcube_imap::count, search): ESEARCH's RETURN options.
        $count = $imap->search($folder, 'UNSEEN', true, ['COUNT']);
        $out['unseen_count'] = $count->count();
        $minmax = $imap->search($folder, 'ALL', true, ['MIN', 'MAX']);
        $out['uid_min'] = (int) $minmax->min();
        $out['uid_max'] = (int) $minmax->max();
        $out['flagged'] = uids($imap->search($folder, 'FLAGGED', true));
        // The folder list, and a folder's counts and size (the settings' folder page: STATUS, with STATUS=SIZE).
        // Not LIST ... RETURN (STATUS): 1.6.5's parser of that answer stops with a TypeError under PHP 8
        // (tokenizeResponse is given an array), whatever the server says, so Roundcube cannot use it.
        $out['folders'] = $imap->listMailboxes('', '*');
        $out['archive_status'] = $imap->status('Archive', ['MESSAGES', 'UNSEEN', 'SIZE']);
        // A base64 attachment, decoded by the server (BINARY[]; rcube_imap_generic::handlePartBody).
        $out['attachment'] = base64_encode((string) $imap->handlePartBody($folder, $request['attachment_uid'], true, '2', 'base64'));
        $out['status'] = $imap->status($folder, ['MESSAGES', 'UNSEEN', 'UIDNEXT']);
        break;

    case 'remember':
        // What a cache keeps for QRESYNC (rcube_imap_cache): UIDVALIDITY, HIGHESTMODSEQ and the UIDs it knows.
        $imap->enable('QRESYNC');
        $imap->select($folder);
        $out['uidvalidity'] = $imap->data['UIDVALIDITY'];
        $out['highestmodseq'] = $imap->data['HIGHESTMODSEQ'];
        $out['uids'] = uids($imap->search($folder, 'ALL', true));
        break;

    case 'resync':
        // Coming back (rcube_imap_cache::synchronize): SELECT with QRESYNC, then UID FETCH CHANGEDSINCE VANISHED.
        $known = $request['known'];
        $imap->enable('QRESYNC');
        $imap->select($folder, [$known['uidvalidity'], $known['highestmodseq'], $known['uids']]);
        $out['vanished_on_select'] = $imap->data['VANISHED'] ?? null;
        $changed = [];
        foreach ($imap->data['QRESYNC'] ?? [] as $uid => $item) {
            $changed[(string) $uid] = $item['flags'];
        }
        $out['changed_on_select'] = $changed;
        $out['highestmodseq'] = $imap->data['HIGHESTMODSEQ'];
        unset($imap->data['VANISHED']);
        $fetched = $imap->fetch($folder, '1:*', true, ['FLAGS'], $known['highestmodseq'], true);
        $flags = [];
        foreach ($fetched as $header) {
            $flags[(string) $header->uid] = array_keys(array_filter($header->flags));
        }
        $out['changed_since'] = $flags;
        $out['vanished_since'] = $imap->data['VANISHED'] ?? null;
        break;

    default:
        fwrite(STDERR, "unknown step\n");
        exit(2);
}

$imap->closeConnection();
$out['sent'] = $sent;
echo json_encode($out, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES), "\n";
