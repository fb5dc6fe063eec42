package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/spf13/cobra"

	"blindperso/issuer"
	"blindperso/perso"
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

func importCmd() *cobra.Command {
	var batch, out string
	var workers int
	c := &cobra.Command{
		Use:   "import --token URI --key L --kek L --batch FILE --out KEYS.ndjson",
		Short: "Derive and wrap every card's K_I in the token from a station batch",
		Long: `Check the batch against its manifest (perso's FILE.manifest.json), then for
every record have the token derive the card's K_I from its c and wrap it
under the KEK (RFC 5649). Only the wrapped keys come out: one JSON line per
card in --out. K_I never exists outside the card and the token.

Records that fail (another issuer key, a c the token refuses) are reported
on stderr with the card's Id; the others still land, and the command exits
non-zero at the end.

` + uriHelp,
		Example: `  issuer import --token "$BLINDPERSO_TOKEN" --key issuer-2026 --kek kek-1 \
      --batch batch.ndjson --out cardkeys.ndjson`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c)
	c.Flags().StringVar(&batch, "batch", "", "station batch (NDJSON with its .manifest.json beside it)")
	c.Flags().StringVar(&out, "out", "", "file for the wrapped card keys, NDJSON (must not exist)")
	c.Flags().IntVar(&workers, "workers", 2, "token sessions working in parallel")
	c.MarkFlagRequired("batch")
	c.MarkFlagRequired("out")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		_, recs, err := perso.VerifyBatch(batch)
		if err != nil {
			return err
		}
		is, err := openIssuer(cmd.Context(), workers)
		if err != nil {
			return err
		}
		defer is.Token.Close()
		f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		w := bufio.NewWriter(f)
		enc := json.NewEncoder(w)
		var mu sync.Mutex
		var failed int
		jobs := make(chan perso.Record)
		var wg sync.WaitGroup
		for range max(workers, 1) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for rec := range jobs {
					ck, err := is.Import(cmd.Context(), rec)
					mu.Lock()
					if err != nil {
						failed++
						fmt.Fprintln(cmd.ErrOrStderr(), err)
					} else if err := enc.Encode(ck); err != nil {
						failed++
						fmt.Fprintln(cmd.ErrOrStderr(), err)
					}
					mu.Unlock()
				}
			}()
		}
		for _, r := range recs {
			jobs <- r
		}
		close(jobs)
		wg.Wait()
		if err := errors.Join(w.Flush(), f.Sync()); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%d cards imported, %d failed\n", len(recs)-failed, failed)
		if failed > 0 {
			return fmt.Errorf("%d of %d records failed", failed, len(recs))
		}
		return nil
	}
	return c
}

func verifyCmd() *cobra.Command {
	var keys, id, challenge, mac string
	c := &cobra.Command{
		Use:   "verify --token URI --key L --kek L --keys KEYS.ndjson --id HEX --challenge HEX --mac HEX",
		Short: "Verify a card's answer to a challenge in the token",
		Long: `Unwrap the card's K_I from --keys into the token, verify the card's
AES-CMAC over the challenge there (docs/PROTOCOL.md §4), destroy the key.
Prints "ok" and exits 0, or prints "FAILED" and exits 1: a card that fails
was personalized under another key (the paper's active insider) or is
broken.

` + uriHelp,
		Example: `  ch=$(openssl rand -hex 16)
  mac=$(vcard authenticate --challenge $ch card.json)
  issuer verify --key issuer-2026 --kek kek-1 --keys cardkeys.ndjson --id B100000000000001 --challenge $ch --mac $mac`,
		Args: cobra.NoArgs,
	}
	openIssuer := issuerFlags(c)
	c.Flags().StringVar(&keys, "keys", "", "wrapped card keys from issuer import")
	c.Flags().StringVar(&id, "id", "", "card Id, hex")
	c.Flags().StringVar(&challenge, "challenge", "", "the 16-byte challenge, hex")
	c.Flags().StringVar(&mac, "mac", "", "the card's 16-byte answer, hex")
	for _, f := range []string{"keys", "id", "challenge", "mac"} {
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
		ck, err := findCardKey(keys, raw[0])
		if err != nil {
			return err
		}
		is, err := openIssuer(cmd.Context(), 1)
		if err != nil {
			return err
		}
		defer is.Token.Close()
		ok, err := is.Verify(cmd.Context(), ck, raw[1], raw[2])
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

func findCardKey(path string, id []byte) (issuer.CardKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return issuer.CardKey{}, err
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	for dec.More() {
		var ck issuer.CardKey
		if err := dec.Decode(&ck); err != nil {
			return issuer.CardKey{}, fmt.Errorf("%s: %w", path, err)
		}
		if bytes.Equal(ck.ID, id) {
			return ck, nil
		}
	}
	return issuer.CardKey{}, fmt.Errorf("card %X is not in %s", id, path)
}
