package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"blindperso/export"
	"blindperso/issuer"
)

// issuer export: hand card keys to a receiving system (docs/EXPORT.md).
// The work is issuer.Exporter's; this is its flags and its words. It is
// a command for the operator at the issuer's host, not an API call
// (docs/EXPORT.md).

func exportCmd() *cobra.Command {
	var kekLabel, ktkLabel, batchID, idsFile, state, out, operator string
	var workers int
	var asJSON bool
	c := &cobra.Command{
		Use:   "export --token URI --db DIR|DSN --kek L --ktk L (--batch ID | --ids FILE | --state S) --out FILE [--workers N] [--operator NAME]",
		Short: "Hand card keys to a receiving system: each K_I re-wrapped in the token under the receiver's KTK, into a file",
		Long: `Export the keys of a selection of cards for a receiving system (an
authentication centre, a bank's HSM, a second issuer site) that holds the
key-transport key (KTK) labelled --ktk.

For each card, in Id order, the token unwraps the stored blob under the KEK
(--kek) into a session key that can do nothing, wraps it under the KTK with
AES key wrap (RFC 3394) and destroys it: K_I never leaves the token
unwrapped, and the host sees it only under the receiver's key.

The cards: those of one imported batch (--batch ID, as issuer batches list
shows it), those of an Id list (--ids FILE: one card Id in hex per line;
blank lines and # comments are ignored; an Id not in the store stops the
export before anything is written), or those in one state (--state active,
blocked or conflict). Exactly one of the three.

The file (--out FILE) holds one JSON line per card: its Id, its profile,
K_I wrapped under the KTK, and K_I's check value where the token computes
one. Beside it, FILE.manifest.json names the KTK (label and check value),
the issuer's token, the selection, and the file's line count, size and
SHA-256. Nothing in either is secret; send both to the receiver, who
checks the manifest, unwraps each key in its own HSM (RFC 3394's integrity
check refuses a changed line) and can verify a card's MAC with it.

The KTK must come from the key ceremony: the receiver's HSM generates it
and encrypts it to this issuer's key-import key, and the security officer
imports it (trusted, on a token that enforces CKA_WRAP_WITH_TRUSTED, as
SoftHSM2 does; an untrusted KTK is refused there). A KEK given as --ktk is
refused: a KTK can wrap and not unwrap.

Resuming: the lines go to FILE.partial, synced every 1024 cards, and every
export and every card it wrote is logged in the store (issuer export list).
If the command is interrupted (a crash, kill -9, a lost token), run the
same command again: it re-reads FILE.partial, cuts off a torn last line,
and continues after the last complete card. RFC 3394 is deterministic, so
the finished file is byte for byte the one an uninterrupted run writes.
Only when every card is written does FILE.partial become FILE, with its
manifest. An existing FILE is never overwritten; a FILE.partial from other
arguments is refused (finish it with those, or remove it).

` + uriHelp,
		Example: `  issuer export --token "$BLINDPERSO_TOKEN" --db /var/lib/blindperso-issuer --kek kek-2026 \
      --ktk ktk-bank-2026 --batch 3f2a…c9 --out bank-2026-12.ndjson
  issuer export --kek kek-2026 --ktk ktk-bank-2026 --ids cards-for-bank.txt --out bank-extra.ndjson --operator alice
  issuer export --kek kek-2026 --ktk ktk-site-b --state active --out site-b.ndjson --workers 4
  issuer export list --db /var/lib/blindperso-issuer`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	openStore := dbFlag(c)
	c.Flags().StringVar(&kekLabel, "kek", "", "label of the KEK the cards' keys are stored under")
	c.Flags().StringVar(&ktkLabel, "ktk", "", "label of the receiver's key-transport key (imported by the key ceremony)")
	c.Flags().StringVar(&batchID, "batch", "", "export the cards of this batch (its id, the SHA-256 issuer import printed)")
	c.Flags().StringVar(&idsFile, "ids", "", "export the cards listed in FILE (one hex Id per line; blank lines and # comments ignored)")
	c.Flags().StringVar(&state, "state", "", "export the cards in this state: active, blocked or conflict")
	c.Flags().StringVar(&out, "out", "", "the export file to write (FILE.manifest.json beside it); must not exist")
	c.Flags().IntVar(&workers, "workers", 2, "token sessions working in parallel")
	c.Flags().StringVar(&operator, "operator", "", "who runs the export, for the store's log (default $USER)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	for _, f := range []string{"kek", "ktk", "out"} {
		c.MarkFlagRequired(f)
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx := cmd.Context() // cancelled by SIGINT and SIGTERM (main)
		if workers < 1 || workers > 64 {
			return fmt.Errorf("--workers %d: want 1 to 64", workers)
		}
		n := 0
		for _, v := range []string{batchID, idsFile, state} {
			if v != "" {
				n++
			}
		}
		if n != 1 {
			return errors.New("select the cards with exactly one of --batch ID, --ids FILE or --state active|blocked|conflict")
		}
		sel := issuer.ExportSelection{Batch: batchID, State: state}
		if idsFile != "" {
			var err error
			if sel, err = issuer.ReadIDList(idsFile); err != nil {
				return err
			}
		}
		switch state {
		case "", issuer.StateActive, issuer.StateBlocked, issuer.StateConflict:
		default:
			return fmt.Errorf("--state %q: want active, blocked or conflict", state)
		}
		if operator == "" {
			operator = os.Getenv("USER")
		}
		if operator == "" {
			return errors.New("say who runs the export: --operator NAME ($USER is not set); it is logged with the export")
		}
		atLeastProcs(workers)
		tok, err := open(workers)
		if err != nil {
			return err
		}
		defer tok.Close()
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		kek, err := tok.FindKEK(ctx, kekLabel)
		if err != nil {
			return fmt.Errorf("--kek: %w", err)
		}
		ktk, err := issuer.FindKTK(ctx, tok, ktkLabel)
		if err != nil {
			return fmt.Errorf("--ktk: %w", err)
		}
		ex := &issuer.Exporter{Store: st, Token: tok, KEK: kek, KTK: ktk, Workers: workers, Operator: operator}
		stderr := cmd.ErrOrStderr()
		progress := false
		if isTerminal(stderr) && !asJSON {
			var last time.Time
			ex.Progress = func(p issuer.ExportProgress) {
				if time.Since(last) < time.Second && p.Done < p.Total {
					return
				}
				last, progress = time.Now(), true
				rate := float64(p.Done-p.Resumed) / max(p.Elapsed.Seconds(), 1e-9)
				fmt.Fprintf(stderr, "\r%d of %d cards exported (%.0f/s)   ", p.Done, p.Total, rate)
			}
		}
		res, err := ex.Export(ctx, sel, out)
		if progress {
			fmt.Fprintln(stderr)
		}
		if err != nil {
			return err
		}
		if res.Resumed > 0 {
			torn := ""
			if res.TornBytes > 0 {
				torn = fmt.Sprintf("; a torn last line of %d bytes was cut off", res.TornBytes)
			}
			fmt.Fprintf(stderr, "resumed %s: %d cards were written by an earlier run%s\n", export.PartialPath(res.File), res.Resumed, torn)
		}
		if asJSON {
			return printJSON(cmd, res)
		}
		cv := "no check value: the token gives none"
		if m := res.Manifest.KTK.CheckValue; m != nil {
			cv = "check value " + m.String()
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%d cards exported to %s under KTK %s (%s), SHA-256 %x\n",
			res.Manifest.Count, res.File, res.Manifest.KTK.Label, cv, []byte(res.Manifest.SHA256))
		return nil
	}
	c.AddCommand(exportListCmd())
	return c
}

func exportListCmd() *cobra.Command {
	var asJSON bool
	var cardsOf string
	c := &cobra.Command{
		Use:   "list [--db DIR|DSN] [--json] [--cards EXPORT-ID]",
		Short: "List the exports logged in the store, oldest first (or the cards of one)",
		Long: `One line per export: its id, status (running: in progress or
interrupted, run the same export again to finish it; done; abandoned: its
partial file was removed and another export to the same file begun), when
it started, who ran it, the KTK (label and check value), the number of
cards, the selection and the file, and for a finished export the file's
SHA-256. With --cards EXPORT-ID, the Ids of the cards that export wrote,
one per line.`,
		Example: `  issuer export list --db /var/lib/blindperso-issuer
  issuer export list --cards 5d0c… > exported-ids.txt`,
		Args: cobra.NoArgs,
	}
	openStore := dbFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print a JSON array of exports")
	c.Flags().StringVar(&cardsOf, "cards", "", "print the Ids of the cards of this export")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx := cmd.Context()
		st, err := openStore(ctx)
		if err != nil {
			return err
		}
		defer st.Close()
		w := cmd.OutOrStdout()
		if cardsOf != "" {
			var after []byte
			for {
				ids, err := st.ExportedCards(ctx, cardsOf, after, 4096)
				if err != nil {
					return err
				}
				if len(ids) == 0 {
					return nil
				}
				for _, id := range ids {
					fmt.Fprintf(w, "%s\n", id)
				}
				after = ids[len(ids)-1]
			}
		}
		es, err := st.Exports(ctx)
		if err != nil {
			return err
		}
		if asJSON {
			if es == nil {
				es = []issuer.ExportLog{}
			}
			return printJSON(cmd, es)
		}
		for _, e := range es {
			cv := ""
			if e.KTKCheckValue != nil {
				cv = " (check value " + e.KTKCheckValue.String() + ")"
			}
			sum := ""
			if e.SHA256 != nil {
				sum = ", SHA-256 " + e.SHA256.String()
			}
			fmt.Fprintf(w, "%s  %-9s %s  by %s: %d cards under KTK %s%s, %s, to %s%s\n",
				e.ID, e.Status, e.Started.UTC().Format(time.RFC3339), e.Operator, e.Count, e.KTK, cv, e.Selection, e.File, sum)
		}
		return nil
	}
	return c
}
