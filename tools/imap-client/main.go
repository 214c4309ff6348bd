// Command imap-client is a real IMAP4rev2 client against the node: emersion's go-imap v2 client library,
// which speaks IMAP4rev2 (RFC 9051) once it has enabled it. tests/node/test_imap_goimap.py builds it and
// runs it against a live node. It logs in over STARTTLS (the certificate verified), sends ENABLE
// IMAP4rev2, then does what a mail client does with the forms IMAP4rev2 brings: creates and fills a folder
// with a non-ASCII name (UTF-8 on the wire), lists every folder with its counts in one LIST ... RETURN
// (STATUS (...)) (LIST-STATUS, STATUS=SIZE, DELETED), selects it (SELECT's LIST response), searches
// (answered as ESEARCH), sorts and threads on the server, fetches a decoded attachment (BINARY), moves a
// message (MOVE, with its COPYUID) and asks for the namespaces. It prints one JSON object: what the
// library returned, and the command lines it sent.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"regexp"
	"sort"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
)

// Folder is "Été/Reçus": a child of a folder that also has a non-ASCII name.
const Folder = "Été/Reçus"

type folderData struct {
	Attrs    []string `json:"attrs"`
	Messages *uint32  `json:"messages"`
	Unseen   *uint32  `json:"unseen"`
	Deleted  *uint32  `json:"deleted"`
	Size     *int64   `json:"size"`
}

type thread struct {
	Chain      []uint32 `json:"chain"`
	SubThreads []thread `json:"subthreads"`
}

type result struct {
	Capabilities []string              `json:"capabilities"`
	Enabled      []string              `json:"enabled"`
	Folders      map[string]folderData `json:"folders"`
	Status       folderData            `json:"status"`
	Selected     struct {
		Messages uint32   `json:"messages"`
		Mailbox  string   `json:"list_mailbox"`
		Attrs    []string `json:"list_attrs"`
	} `json:"selected"`
	Deleted      []uint32            `json:"deleted_seqnums"`
	Subject      []uint32            `json:"subject_uids"`
	SortedBySize []uint32            `json:"sorted_by_size"`
	Threads      []thread            `json:"threads"`
	Flags        map[string][]string `json:"flags"`
	Attachment   []byte              `json:"attachment"`
	MovedTo      []uint32            `json:"moved_to_uids"`
	InboxHas     uint32              `json:"inbox_messages"`
	Namespace    string              `json:"namespace"`
	Sent         []string            `json:"sent"`
}

func check(err error, step string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "imap-client: %s: %v\n", step, err)
		os.Exit(1)
	}
}

func appendMessage(c *imapclient.Client, mailbox string, flags []imap.Flag, data string) {
	cmd := c.Append(mailbox, int64(len(data)), &imap.AppendOptions{Flags: flags})
	_, err := cmd.Write([]byte(data))
	check(err, "APPEND write")
	check(cmd.Close(), "APPEND close")
	_, err = cmd.Wait()
	check(err, "APPEND")
}

func convertThreads(in []imapclient.ThreadData) []thread {
	out := []thread{}
	for _, t := range in {
		out = append(out, thread{Chain: t.Chain, SubThreads: convertThreads(t.SubThreads)})
	}
	return out
}

func attrs(list []imap.MailboxAttr) []string {
	out := []string{}
	for _, attr := range list {
		out = append(out, string(attr))
	}
	sort.Strings(out)
	return out
}

func main() {
	addr := flag.String("addr", "", "host:port of the node's imap listener")
	user := flag.String("user", "", "")
	password := flag.String("password", "", "")
	caFile := flag.String("ca", "", "the CA certificate that signed the node's")
	attachment := flag.String("attachment", "", "a message with a base64 attachment as part 2")
	flag.Parse()

	pem, err := os.ReadFile(*caFile)
	check(err, "read CA")
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	var transcript bytes.Buffer
	c, err := imapclient.DialStartTLS(*addr, &imapclient.Options{
		TLSConfig:   &tls.Config{RootCAs: pool, ServerName: "localhost"},
		DebugWriter: &transcript,
	})
	check(err, "dial")
	check(c.Login(*user, *password).Wait(), "LOGIN")

	var out result
	for capability := range c.Caps() {
		out.Capabilities = append(out.Capabilities, string(capability))
	}
	sort.Strings(out.Capabilities)
	enabled, err := c.Enable(imap.CapIMAP4rev2).Wait()
	check(err, "ENABLE")
	for capability := range enabled.Caps {
		out.Enabled = append(out.Enabled, string(capability))
	}

	check(c.Create(Folder, nil).Wait(), "CREATE")
	note := func(n int, subject, refs string) string {
		header := ""
		if refs != "" {
			header = "References: " + refs + "\r\n"
		}
		return fmt.Sprintf("From: a@example.org\r\nSubject: %s\r\nMessage-ID: <g%d@example.org>\r\n%s\r\nbody %d %s\r\n",
			subject, n, header, n, bytes.Repeat([]byte("x"), 100*n))
	}
	appendMessage(c, Folder, nil, note(1, "Été en vue", ""))                                               // UID 1
	appendMessage(c, Folder, []imap.Flag{imap.FlagDeleted}, note(2, "Re: Été en vue", "<g1@example.org>")) // UID 2
	appendMessage(c, Folder, []imap.Flag{imap.FlagSeen}, *attachment)                                      // UID 3

	listed, err := c.List("", "*", &imap.ListOptions{ReturnStatus: &imap.StatusOptions{
		NumMessages: true, NumUnseen: true, NumDeleted: true, Size: true,
	}}).Collect()
	check(err, "LIST RETURN (STATUS)")
	out.Folders = map[string]folderData{}
	for _, data := range listed {
		folder := folderData{Attrs: attrs(data.Attrs)}
		if data.Status != nil {
			folder.Messages, folder.Unseen, folder.Deleted, folder.Size = data.Status.NumMessages, data.Status.NumUnseen, data.Status.NumDeleted, data.Status.Size
		}
		out.Folders[data.Mailbox] = folder
	}
	status, err := c.Status(Folder, &imap.StatusOptions{NumMessages: true, NumDeleted: true, Size: true}).Wait()
	check(err, "STATUS")
	out.Status = folderData{Messages: status.NumMessages, Deleted: status.NumDeleted, Size: status.Size}

	selected, err := c.Select(Folder, nil).Wait()
	check(err, "SELECT")
	out.Selected.Messages = selected.NumMessages
	if selected.List != nil {
		out.Selected.Mailbox, out.Selected.Attrs = selected.List.Mailbox, attrs(selected.List.Attrs)
	}
	found, err := c.Search(&imap.SearchCriteria{Flag: []imap.Flag{imap.FlagDeleted}}, nil).Wait()
	check(err, "SEARCH")
	out.Deleted = found.AllSeqNums()
	// A UTF-8 search string: with IMAP4rev2 the library sends it without CHARSET.
	found, err = c.UIDSearch(&imap.SearchCriteria{Header: []imap.SearchCriteriaHeaderField{{Key: "Subject", Value: "été"}}}, nil).Wait()
	check(err, "UID SEARCH")
	for _, uid := range found.AllUIDs() {
		out.Subject = append(out.Subject, uint32(uid))
	}
	out.SortedBySize, err = c.UIDSort(&imapclient.SortOptions{
		SearchCriteria: &imap.SearchCriteria{},
		SortCriteria:   []imapclient.SortCriterion{{Key: imapclient.SortKeySize, Reverse: true}},
	}).Wait()
	check(err, "UID SORT")
	threads, err := c.UIDThread(&imapclient.ThreadOptions{Algorithm: imap.ThreadReferences, SearchCriteria: &imap.SearchCriteria{}}).Wait()
	check(err, "UID THREAD")
	out.Threads = convertThreads(threads)

	part := &imap.FetchItemBinarySection{Part: []int{2}, Peek: true}
	messages, err := c.Fetch(imap.UIDSetNum(1, 2, 3), &imap.FetchOptions{UID: true, Flags: true, BinarySection: []*imap.FetchItemBinarySection{part}}).Collect()
	check(err, "UID FETCH")
	out.Flags = map[string][]string{}
	for _, message := range messages {
		flags := []string{}
		for _, flag := range message.Flags {
			flags = append(flags, string(flag))
		}
		out.Flags[fmt.Sprint(message.UID)] = flags
		if message.UID == 3 {
			out.Attachment = message.FindBinarySection(part)
		}
	}

	moved, err := c.Move(imap.UIDSetNum(1), "INBOX").Wait()
	check(err, "UID MOVE")
	if destinations, ok := moved.DestUIDs.(imap.UIDSet); ok {
		uids, _ := destinations.Nums()
		for _, uid := range uids {
			out.MovedTo = append(out.MovedTo, uint32(uid))
		}
	}
	check(c.Unselect().Wait(), "UNSELECT")
	inbox, err := c.Status("INBOX", &imap.StatusOptions{NumMessages: true}).Wait()
	check(err, "STATUS INBOX")
	out.InboxHas = *inbox.NumMessages
	namespaces, err := c.Namespace().Wait()
	check(err, "NAMESPACE")
	out.Namespace = fmt.Sprintf("%q %q", namespaces.Personal[0].Prefix, string(namespaces.Personal[0].Delim))
	check(c.Logout().Wait(), "LOGOUT")

	// The transcript holds both directions; the client's command lines are those tagged T<n> that are no
	// tagged status response.
	command := regexp.MustCompile(`^T[0-9]+ `)
	tagged := regexp.MustCompile(`^T[0-9]+ (OK|NO|BAD)\b`)
	for _, line := range bytes.Split(transcript.Bytes(), []byte("\r\n")) {
		if command.Match(line) && !tagged.Match(line) {
			out.Sent = append(out.Sent, string(line))
		}
	}
	encoded, err := json.Marshal(out)
	check(err, "JSON")
	fmt.Println(string(encoded))
}
