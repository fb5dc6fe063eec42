package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/issuer"
)

// dbFlag adds --db and returns a function that opens the store it names.
func dbFlag(c *cobra.Command) func(ctx context.Context) (issuer.Store, error) {
	db := c.Flags().String("db", "", "the issuer's store: a data directory for the embedded SQLite store, or a PostgreSQL URL (postgres://…) or key=value DSN (default $"+envDB+", else ./issuer-data)")
	return func(ctx context.Context) (issuer.Store, error) {
		d := *db
		if d == "" {
			d = os.Getenv(envDB)
		}
		if d == "" {
			d = "issuer-data"
		}
		return issuer.Open(ctx, d)
	}
}

const envDB = "BLINDPERSO_ISSUER_DB"

func importCmd() *cobra.Command {
	var batch string
	var workers int
	var asJSON bool
	c := &cobra.Command{
		Use:   "import --token URI --key L --kek L --batch FILE [--db DIR|DSN]",
		Short: "Derive and wrap every card's K_I in the token from a station batch, into the store",
		Long: `Check the batch against its manifest (perso's FILE.manifest.json: size,
SHA-256, line count, issuer key), then stream it: for every record have the
token derive the card's K_I from its c and wrap it under the KEK (RFC 5649),
and store the wrapped key with the card's Id, profile and issuer key. K_I
never exists outside the card and the token; the store holds only public
data and wrapped keys.

Each bad record (unparsable line, unknown profile, another issuer key, a c
of the wrong shape, a c the token refuses) is rejected with its line number
and reason, and the others still land. The same (Id, c) again is a no-op;
the same Id with another c is a conflict, kept aside (the first key stays).
Importing a batch again, after a crash or not, changes nothing that is
already stored. The command exits non-zero if any record was rejected or
conflicted. See docs/ISSUER.md.

` + attestHelp + `

` + uriHelp + "\n\n" + memberHelp,
		Example: `  issuer import --token "$BLINDPERSO_TOKEN" --key issuer-2026 --kek kek-1 \
      --batch batch.ndjson --db /var/lib/blindperso-issuer
  issuer import --key issuer-2026 --kek kek-1 --batch batch.ndjson \
      --chip-roots ceremony-2026/chip-roots.pem --attestation required
  issuer import --key issuer-2026 --kek kek-1 --batch batch.ndjson \
      --db postgres://issuer@db.internal/issuer --workers 4 --json`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c, true)
	openStore := dbFlag(c)
	checker := attestFlags(c)
	c.Flags().StringVar(&batch, "batch", "", "station batch (NDJSON with its .manifest.json beside it)")
	c.Flags().IntVar(&workers, "workers", 2, "token sessions working in parallel")
	c.Flags().BoolVar(&asJSON, "json", false, "print the batch report as JSON")
	c.MarkFlagRequired("batch")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx := cmd.Context()
		atLeastProcs(workers)
		is, err := openIssuer(ctx, workers)
		if err != nil {
			return err
		}
		defer closeIssuer(is)
		ck, err := checker(is)
		if err != nil {
			return err
		}
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		im := &issuer.Importer{Issuer: is, Store: st, Workers: workers, Attest: ck, Log: slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))}
		rep, err := im.ImportFile(ctx, batch)
		if err != nil {
			return err
		}
		d, err := issuer.Detail(ctx, st, rep)
		if err != nil {
			return err
		}
		if asJSON {
			if err := printJSON(cmd, d); err != nil {
				return err
			}
		} else {
			for _, r := range d.RejectList {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: rejected: %s\n", batch, r.Line, r.Reason)
			}
			for _, k := range d.ConflictList {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: CONFLICT: card %x is stored with another c (possible active attack or double personalization); the stored key is kept\n", batch, k.Line, []byte(k.CardID))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "batch %s: %d records: %d cards imported (%d unattested), %d duplicates, %d conflicts, %d rejected\n",
				rep.ID, rep.Records, rep.Imported, rep.Unattested, rep.Duplicates, rep.Conflicts, rep.Rejects)
		}
		if rep.Rejects+rep.Conflicts > 0 {
			return fmt.Errorf("%d rejected and %d conflicting of %d records", rep.Rejects, rep.Conflicts, rep.Records)
		}
		return nil
	}
	return c
}

// hexArg decodes a card Id or another hex argument.
func hexArg(name, v string) ([]byte, error) {
	b, err := hex.DecodeString(v)
	if err != nil || len(b) == 0 {
		return nil, fmt.Errorf("%s %q is not hex (e.g. B100000000000001)", name, v)
	}
	return b, nil
}

// cardErr adds to a "card not found" what to do about it.
func cardErr(err error) error {
	if errors.Is(err, issuer.ErrNotFound) {
		return fmt.Errorf("%w in this store (issuer cards list shows the cards; is --db the right store?)", err)
	}
	return err
}

func printJSON(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func cardsCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "cards",
		Short: "Read cards, authenticate them (challenge, verify), block and unblock them",
		Long: `Work on the cards in the store (--db).

Authentication is the paper's key-integrity check (docs/PROTOCOL.md §4):

  1. issuer cards challenge ID        a fresh random 16-byte challenge for
                                      the card, single-use, valid --ttl
  2. the card answers it              (vcard authenticate, or any terminal)
  3. issuer cards verify ID --challenge HEX --mac HEX
                                      the token checks the card's AES-CMAC
                                      under the K_I it derived at import

A card that fails --max-failures times in a row is blocked (the paper's
blacklist): it was personalized under another key (an active insider
substituted the issuer key) or it is broken. A blocked card, or one in
state conflict (two different c were imported for its Id), is refused
without asking the token. An admin blocks and unblocks cards by hand.
Every verification and admin action is in the card's log (cards show).
See docs/ISSUER.md.`,
	}
	c.AddCommand(cardsShowCmd(), cardsListCmd(), cardsChallengeCmd(), cardsVerifyCmd(), cardsBlockCmd(), cardsUnblockCmd())
	return c
}

func cardsShowCmd() *cobra.Command {
	var asJSON bool
	var logN int
	c := &cobra.Command{
		Use:   "show ID [--db DIR|DSN] [--json]",
		Short: "Show one card: profile, issuer key, batch, state, failed authentications, recent log",
		Long: `Show a card's row (never K_I: only its wrapped blob's scheme and KEK) and
its last --log entries of the auth log: verifications (ok, failed,
blocked, refused, challenge-refused) and admin block/unblock.`,
		Example: `  issuer cards show B100000000000001 --db /var/lib/blindperso-issuer
  issuer cards show B100000000000001 --json | jq .card.state`,
		Args: cobra.ExactArgs(1),
	}
	openStore := dbFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print the card and its log as JSON")
	c.Flags().IntVar(&logN, "log", 10, "how many auth log entries to show, newest first")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := hexArg("card Id", args[0])
		if err != nil {
			return err
		}
		st, err := openStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		card, err := st.Card(cmd.Context(), id)
		if err != nil {
			return cardErr(err)
		}
		log, err := st.AuthLog(cmd.Context(), id, logN)
		if err != nil {
			return err
		}
		if asJSON {
			card.Blob.Wrapped = nil // public anyway, but of no use to a reader
			return printJSON(cmd, struct {
				Card issuer.StoredCard  `json:"card"`
				Log  []issuer.AuthEntry `json:"log"`
			}{card, log})
		}
		w := cmd.OutOrStdout()
		fmt.Fprintf(w, "card         %x\n", []byte(card.ID))
		fmt.Fprintf(w, "state        %s%s\n", card.State, paren(card.StateReason))
		fmt.Fprintf(w, "failed auth  %d\n", card.FailedAuth)
		fmt.Fprintf(w, "profile      %s\n", card.Profile)
		fmt.Fprintf(w, "attested     %s\n", attestedText(card.Attested))
		fmt.Fprintf(w, "issuer key   %s sha256 %x\n", card.IssuerKeyLabel, []byte(card.IssuerFingerprint))
		fmt.Fprintf(w, "K_I          wrapped (%s) under KEK %s\n", card.Blob.Scheme, card.Blob.KEK)
		fmt.Fprintf(w, "batch        %s line %d\n", card.Batch, card.Line)
		fmt.Fprintf(w, "created      %s\nupdated      %s\n", card.Created.Format(time.RFC3339), card.Updated.Format(time.RFC3339))
		for _, e := range log {
			fmt.Fprintf(w, "log          %s  %-17s %s\n", e.Time.Format(time.RFC3339), e.Result, e.Detail)
		}
		return nil
	}
	return c
}

func paren(s string) string {
	if s == "" {
		return ""
	}
	return " (" + s + ")"
}

func cardsListCmd() *cobra.Command {
	var asJSON bool
	var state string
	c := &cobra.Command{
		Use:   "list [--state active|blocked|conflict] [--db DIR|DSN] [--json]",
		Short: "List the cards, ordered by Id, optionally only those in one state",
		Example: `  issuer cards list --state blocked
  issuer cards list --json | jq -r '.[] | select(.failed_auth > 0) | .id'`,
		Args: cobra.NoArgs,
	}
	openStore := dbFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print a JSON array of cards")
	c.Flags().StringVar(&state, "state", "", "only cards in this state: active, blocked or conflict")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		switch state {
		case "", issuer.StateActive, issuer.StateBlocked, issuer.StateConflict:
		default:
			return fmt.Errorf("--state %q: want active, blocked or conflict", state)
		}
		st, err := openStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		cards, err := st.Cards(cmd.Context(), state)
		if err != nil {
			return err
		}
		if asJSON {
			if cards == nil {
				cards = []issuer.StoredCard{}
			}
			for i := range cards {
				cards[i].Blob.Wrapped = nil
			}
			return printJSON(cmd, cards)
		}
		for _, c := range cards {
			fmt.Fprintf(cmd.OutOrStdout(), "%-32x %-8s failed %d  %s  batch %.12s… line %d%s\n",
				[]byte(c.ID), c.State, c.FailedAuth, c.Profile, c.Batch, c.Line, paren(c.StateReason))
		}
		return nil
	}
	return c
}

func cardsChallengeCmd() *cobra.Command {
	var ttl time.Duration
	var asJSON bool
	c := &cobra.Command{
		Use:   "challenge ID [--ttl 5m] [--db DIR|DSN] [--json]",
		Short: "Issue a fresh 16-byte challenge for a card and print it in hex",
		Long: `Draw 16 random bytes (crypto/rand), store them as a challenge for the card,
valid for --ttl and for one verification only, and print them in hex. Give
them to the card (vcard authenticate --challenge HEX, or any terminal:
AUTHENTICATE, docs/PROTOCOL.md §6.3), then pass its answer to
issuer cards verify. A blocked card or a card in conflict gets no
challenge. No token is needed for this step. Challenges that expired
over an hour ago, used or not, are purged as new ones are issued.`,
		Example: `  ch=$(issuer cards challenge B100000000000001)
  mac=$(vcard authenticate --challenge "$ch" card.json)
  issuer cards verify B100000000000001 --challenge "$ch" --mac "$mac" --key issuer-2026 --kek kek-1`,
		Args: cobra.ExactArgs(1),
	}
	openStore := dbFlag(c)
	c.Flags().DurationVar(&ttl, "ttl", issuer.DefaultChallengeTTL, "how long the challenge can be answered")
	c.Flags().BoolVar(&asJSON, "json", false, "print the challenge, card and expiry as JSON")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := hexArg("card Id", args[0])
		if err != nil {
			return err
		}
		if ttl <= 0 {
			return fmt.Errorf("--ttl %s: must be positive", ttl)
		}
		st, err := openStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		a := &issuer.Authenticator{Store: st, TTL: ttl}
		ch, err := a.Challenge(cmd.Context(), id)
		if err != nil {
			return cardErr(err)
		}
		if asJSON {
			return printJSON(cmd, ch)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%x\n", []byte(ch.Challenge))
		return nil
	}
	return c
}

func cardsVerifyCmd() *cobra.Command {
	var challenge, mac string
	var maxFailures int
	var asJSON bool
	c := &cobra.Command{
		Use:   "verify ID --challenge HEX --mac HEX --token URI --key L --kek L [--db DIR|DSN] [--max-failures 3] [--json]",
		Short: "Verify a card's answer to its challenge in the token, and record the result",
		Long: `Unwrap the card's K_I into the token and verify the card's AES-CMAC over
the challenge there (docs/PROTOCOL.md §4), then, in one store transaction
(shared with any verifications running at the same time through the same
store handle: group commit), consume the challenge (it must have been
issued for this card by issuer cards challenge, be unused and unexpired:
exactly one of several concurrent verifiers, even on several issuer
instances sharing one PostgreSQL, gets it) and record the result in the
card's log. The answer is printed once that transaction has committed.

Prints "ok" and exits 0: the card holds the K_I the issuer derived, its
failed-authentication count is reset to 0.
Prints "FAILED (n of max)" and exits 1: the MAC does not verify; n
failures in a row so far. At the limit the card is blocked and this
prints "BLOCKED". A card personalized under a substituted issuer key
(paper Fig. 2) fails every time: investigate the station that made it.
Prints "BLOCKED" or "REFUSED: card in conflict" and exits 1 without
asking the token for a card already blocked or in conflict.
A challenge that is unknown, used, expired or for another card is an
error (exit 1) that does not count against the card: get a new one.

` + uriHelp + "\n\n" + memberHelp,
		Example: `  ch=$(issuer cards challenge B100000000000001)
  mac=$(vcard authenticate --challenge "$ch" card.json)
  issuer cards verify B100000000000001 --challenge "$ch" --mac "$mac" \
      --key issuer-2026 --kek kek-1 --db /var/lib/blindperso-issuer`,
		Args: cobra.ExactArgs(1),
	}
	openIssuer := issuerFlags(c, false)
	openStore := dbFlag(c)
	c.Flags().StringVar(&challenge, "challenge", "", "the challenge from issuer cards challenge, hex")
	c.Flags().StringVar(&mac, "mac", "", "the card's 16-byte answer, hex")
	c.Flags().IntVar(&maxFailures, "max-failures", issuer.DefaultMaxFailures, "failed verifications in a row that block the card")
	c.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	c.MarkFlagRequired("challenge")
	c.MarkFlagRequired("mac")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := hexArg("card Id", args[0])
		if err != nil {
			return err
		}
		ch, err := hexArg("--challenge", challenge)
		if err != nil {
			return err
		}
		m, err := hexArg("--mac", mac)
		if err != nil {
			return err
		}
		if maxFailures < 1 {
			return fmt.Errorf("--max-failures %d: must be at least 1", maxFailures)
		}
		ctx := cmd.Context()
		is, err := openIssuer(ctx, 1)
		if err != nil {
			return err
		}
		defer closeIssuer(is)
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		a := &issuer.Authenticator{Verifier: is, Store: st, MaxFailures: maxFailures}
		res, err := a.Verify(ctx, id, ch, m)
		if err != nil {
			if errors.Is(err, issuer.ErrChallengeUsed) || errors.Is(err, issuer.ErrChallengeExpired) ||
				errors.Is(err, issuer.ErrChallengeUnknown) || errors.Is(err, issuer.ErrChallengeOtherCard) {
				return fmt.Errorf("%w; the card's count is unchanged: get a new challenge with issuer cards challenge", err)
			}
			return err
		}
		if asJSON {
			if err := printJSON(cmd, res); err != nil {
				return err
			}
		} else {
			w := cmd.OutOrStdout()
			switch {
			case res.OK:
				fmt.Fprintln(w, "ok")
			case res.State == issuer.StateBlocked:
				fmt.Fprintln(w, "BLOCKED")
			case res.State == issuer.StateConflict:
				fmt.Fprintln(w, "REFUSED: card in conflict")
			default:
				fmt.Fprintf(w, "FAILED (%d of %d)\n", res.FailedAuth, res.MaxFailures)
			}
		}
		switch res.Result {
		case issuer.AuthOK:
			return nil
		case issuer.AuthFailed:
			return fmt.Errorf("card %x: MAC does not verify (%d of %d failures before it is blocked)", id, res.FailedAuth, res.MaxFailures)
		case issuer.AuthBlocked:
			return fmt.Errorf("card %x: MAC does not verify; %d failures in a row: the card is now blocked", id, res.FailedAuth)
		default:
			return fmt.Errorf("card %x is %s: refused without asking the token (see issuer cards show)", id, res.State)
		}
	}
	return c
}

func attestedText(ok bool) string {
	if ok {
		return "yes (the chip's attestation verified at import)"
	}
	return "no (imported without a verified chip attestation)"
}

// printCard prints a card's new state after block or unblock.
func printCard(cmd *cobra.Command, card issuer.StoredCard, asJSON bool) error {
	if asJSON {
		card.Blob.Wrapped = nil
		return printJSON(cmd, card)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "card %x %s%s, failed auth %d\n", []byte(card.ID), card.State, paren(card.StateReason), card.FailedAuth)
	return nil
}

func cardsBlockCmd() *cobra.Command {
	var reason string
	var asJSON bool
	c := &cobra.Command{
		Use:   "block ID --reason TEXT [--db DIR|DSN] [--json]",
		Short: "Block a card by hand: it gets no challenge and every verification is refused",
		Long: `Block a card (from any state) with a reason kept on the card and in its
log: for a card reported stolen, a card from a suspect station, a card in
conflict that should stay out of service. Undo with issuer cards unblock.`,
		Example: `  issuer cards block B100000000000001 --reason "reported lost, ticket 4711"`,
		Args:    cobra.ExactArgs(1),
	}
	openStore := dbFlag(c)
	c.Flags().StringVar(&reason, "reason", "", "why (kept on the card and in its log)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the card as JSON")
	c.MarkFlagRequired("reason")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := hexArg("card Id", args[0])
		if err != nil {
			return err
		}
		if strings.TrimSpace(reason) == "" {
			return errors.New("--reason must say why")
		}
		return setCardState(cmd, id, openStore, asJSON, func(st issuer.Store, id []byte) (issuer.StoredCard, error) {
			return st.BlockCard(cmd.Context(), id, reason, time.Now())
		})
	}
	return c
}

func cardsUnblockCmd() *cobra.Command {
	var reason string
	var asJSON bool
	c := &cobra.Command{
		Use:   "unblock ID [--reason TEXT] [--db DIR|DSN] [--json]",
		Short: "Unblock a blocked card and reset its failed-authentication count",
		Long: `Put a blocked card back in service with its failed-authentication count at
0. A card for which a conflicting c was ever imported goes back to state
conflict, not active: unblocking does not resolve a conflict. Before
unblocking a card blocked by failed verifications, find out why it failed
(a substituted issuer key fails for ever; see docs/ISSUER.md).`,
		Example: `  issuer cards unblock B100000000000001 --reason "card replaced in reader, MAC ok now"`,
		Args:    cobra.ExactArgs(1),
	}
	openStore := dbFlag(c)
	c.Flags().StringVar(&reason, "reason", "", "why (kept in the card's log)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the card as JSON")
	c.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := hexArg("card Id", args[0])
		if err != nil {
			return err
		}
		return setCardState(cmd, id, openStore, asJSON, func(st issuer.Store, id []byte) (issuer.StoredCard, error) {
			return st.UnblockCard(cmd.Context(), id, reason, time.Now())
		})
	}
	return c
}

// setCardState is block and unblock: open the store, change card id
// with set, print the card.
func setCardState(cmd *cobra.Command, id []byte, openStore func(context.Context) (issuer.Store, error), asJSON bool,
	set func(issuer.Store, []byte) (issuer.StoredCard, error)) error {
	st, err := openStore(cmd.Context())
	if err != nil {
		return err
	}
	defer st.Close()
	card, err := set(st, id)
	if err != nil {
		return cardErr(err)
	}
	return printCard(cmd, card, asJSON)
}
