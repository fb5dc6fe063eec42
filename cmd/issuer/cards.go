package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"blindperso/issuer"
)

// issuerFlags adds --key and --kek and returns a function that opens the
// token and finds both keys in it.
func issuerFlags(c *cobra.Command) func(ctx context.Context, sessions int) (*issuer.Issuer, error) {
	open := tokenFlag(c)
	key := c.Flags().String("key", "", "label of the issuer key in the token (required)")
	kek := c.Flags().String("kek", "", "label of the KEK in the token (required)")
	c.MarkFlagRequired("key")
	c.MarkFlagRequired("kek")
	return func(ctx context.Context, sessions int) (*issuer.Issuer, error) {
		tok, err := open(sessions)
		if err != nil {
			return nil, err
		}
		k, err := tok.FindIssuerKey(ctx, *key)
		if err != nil {
			tok.Close()
			return nil, err
		}
		w, err := tok.FindKEK(ctx, *kek)
		if err != nil {
			tok.Close()
			return nil, err
		}
		return &issuer.Issuer{Token: tok, Key: k, KEK: w}, nil
	}
}

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

` + uriHelp,
		Example: `  issuer import --token "$BLINDPERSO_TOKEN" --key issuer-2026 --kek kek-1 \
      --batch batch.ndjson --db /var/lib/blindperso-issuer
  issuer import --key issuer-2026 --kek kek-1 --batch batch.ndjson \
      --db postgres://issuer@db.internal/issuer --workers 4 --json`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c)
	openStore := dbFlag(c)
	c.Flags().StringVar(&batch, "batch", "", "station batch (NDJSON with its .manifest.json beside it)")
	c.Flags().IntVar(&workers, "workers", 2, "token sessions working in parallel")
	c.Flags().BoolVar(&asJSON, "json", false, "print the batch report as JSON")
	c.MarkFlagRequired("batch")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx := cmd.Context()
		st, err := openStore(ctx)
		if err != nil {
			return err
		}
		defer st.Close()
		is, err := openIssuer(ctx, workers)
		if err != nil {
			return err
		}
		defer is.Token.Close()
		im := &issuer.Importer{Issuer: is, Store: st, Workers: workers}
		rep, err := im.ImportFile(ctx, batch)
		if err != nil {
			return err
		}
		rejects, err := st.Rejects(ctx, rep.ID)
		if err != nil {
			return err
		}
		conflicts, err := st.Conflicts(ctx, rep.ID)
		if err != nil {
			return err
		}
		if asJSON {
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			if err := enc.Encode(struct {
				issuer.BatchReport
				RejectList   []issuer.Reject         `json:"reject_list"`
				ConflictList []issuer.ConflictRecord `json:"conflict_list"`
			}{rep, rejects, conflicts}); err != nil {
				return err
			}
		} else {
			for _, r := range rejects {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: rejected: %s\n", batch, r.Line, r.Reason)
			}
			for _, k := range conflicts {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s line %d: CONFLICT: card %X is stored with another c (possible active attack or double personalization); the stored key is kept\n", batch, k.Line, []byte(k.CardID))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "batch %s: %d records: %d cards imported, %d duplicates, %d conflicts, %d rejected\n",
				rep.ID, rep.Records, rep.Imported, rep.Duplicates, rep.Conflicts, rep.Rejects)
		}
		if rep.Rejects+rep.Conflicts > 0 {
			return fmt.Errorf("%d rejected and %d conflicting of %d records", rep.Rejects, rep.Conflicts, rep.Records)
		}
		return nil
	}
	return c
}

func verifyCmd() *cobra.Command {
	var id, challenge, mac string
	c := &cobra.Command{
		Use:   "verify --token URI --key L --kek L [--db DIR|DSN] --id HEX --challenge HEX --mac HEX",
		Short: "Verify a card's answer to a challenge in the token",
		Long: `Take the card's wrapped K_I from the store, unwrap it into the token,
verify the card's AES-CMAC over the challenge there (docs/PROTOCOL.md §4),
destroy the key. Prints "ok" and exits 0, or prints "FAILED" and exits 1:
a card that fails was personalized under another key (the paper's active
insider) or is broken. A card whose state is not active (conflict,
blocked) is still verified, with a warning on stderr.

` + uriHelp,
		Example: `  ch=$(openssl rand -hex 16)
  mac=$(vcard authenticate --challenge $ch card.json)
  issuer verify --key issuer-2026 --kek kek-1 --db /var/lib/blindperso-issuer --id B100000000000001 --challenge $ch --mac $mac`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c)
	openStore := dbFlag(c)
	c.Flags().StringVar(&id, "id", "", "card Id, hex")
	c.Flags().StringVar(&challenge, "challenge", "", "the 16-byte challenge, hex")
	c.Flags().StringVar(&mac, "mac", "", "the card's 16-byte answer, hex")
	for _, f := range []string{"id", "challenge", "mac"} {
		c.MarkFlagRequired(f)
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		var raw [3][]byte
		for i, v := range []struct{ name, val string }{{"--id", id}, {"--challenge", challenge}, {"--mac", mac}} {
			b, err := hex.DecodeString(v.val)
			if err != nil {
				return fmt.Errorf("%s is not hex: %w", v.name, err)
			}
			raw[i] = b
		}
		st, err := openStore(cmd.Context())
		if err != nil {
			return err
		}
		defer st.Close()
		sc, err := st.Card(cmd.Context(), raw[0])
		if err != nil {
			return err
		}
		if sc.State != issuer.StateActive {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: card %X is %s in the store\n", raw[0], sc.State)
		}
		is, err := openIssuer(cmd.Context(), 1)
		if err != nil {
			return err
		}
		defer is.Token.Close()
		ok, err := is.Verify(cmd.Context(), sc.CardKey, raw[1], raw[2])
		if err != nil {
			return err
		}
		if !ok {
			fmt.Fprintln(cmd.OutOrStdout(), "FAILED")
			return fmt.Errorf("card %s: MAC does not verify", id)
		}
		fmt.Fprintln(cmd.OutOrStdout(), "ok")
		return nil
	}
	return c
}
