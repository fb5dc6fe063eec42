package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/hsm"
	"blindperso/pinholder"
)

// Environment variables the token commands read.
const (
	envToken = "BLINDPERSO_TOKEN"  // default for --token
	envSOPIN = "BLINDPERSO_SO_PIN" // the security officer's PIN, if no --so-pin-file
)

// uriHelp is shared by the token commands' help.
var uriHelp = `The token is named by an RFC 7512 PKCS#11 URI (or $BLINDPERSO_TOKEN):

  SoftHSM2:
    pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin
  NSS softokn (database made with certutil -N -d sql:DIR --empty-password):
    pkcs11:token=NSS%20Certificate%20DB?module-path=/usr/lib/x86_64-linux-gnu/libsoftokn3.so&x-nss-configdir=/var/lib/blindperso/nssdb

token= is the token label (serial= also works), module-path= the PKCS#11
library. The PIN comes from pin-source=file:PATH (a trailing newline is
ignored) or pin-source=env:VAR; pin-value is refused: a PIN never goes on
a command line. Quote the URI in a shell: it contains '&'.
x-blindperso-table=KEY names the token's mechanism table when the
manufacturer and model it reports do not select one (` + tableKeys + `).
A token whose table says it cannot keep secrets inside it (YubiHSM 2,
Google Cloud KMS) is refused, with the reason.
See docs/HSM.md.`

// tableKeys lists the values x-blindperso-table takes, for the help.
var tableKeys = strings.Join(hsm.TableNames(), ", ")

// tokenURIs is the URIs of a repeatable --token, or else those in
// $BLINDPERSO_TOKEN (separated by spaces or newlines: URIs have none).
func tokenURIs(flag []string) ([]string, error) {
	list := flag
	if len(list) == 0 {
		list = strings.Fields(os.Getenv(envToken))
	}
	if len(list) == 0 {
		return nil, errors.New("no token: give --token URI or set " + envToken)
	}
	return list, nil
}

// tokenFlag adds --token to c, for a command that runs on one token, and
// returns a function that opens the token.
func tokenFlag(c *cobra.Command) func(sessions int) (*hsm.Token, error) {
	uri := c.Flags().String("token", "", "PKCS#11 URI of the token (default $"+envToken+"); one token: in a group, the member to use")
	return func(sessions int) (*hsm.Token, error) {
		var list []string
		if *uri != "" {
			list = []string{*uri}
		}
		list, err := tokenURIs(list)
		if err != nil {
			return nil, err
		}
		if len(list) > 1 {
			return nil, fmt.Errorf("%s names %d tokens (a group), and %s runs on one: give the member to use as --token (docs/OPERATIONS.md §5, \"In a token group\")", envToken, len(list), c.CommandPath())
		}
		return hsm.OpenURI(list[0], sessions)
	}
}

func probeCmd() *cobra.Command {
	var asJSON, noAttack bool
	c := &cobra.Command{
		Use:   "probe --token URI [--token URI ...] [--key L --kek L] [--so-pin-file FILE] [--json]",
		Short: "Say which profiles a token runs in-token, and what a holder of its user PIN can take out",
		Long: `Read the token's mechanism list, try every step the in-token chains need
on throwaway session objects (all destroyed afterwards; the token's keys
are not touched), and print, per profile, "runnable" or "not runnable:
missing CKM_…". A step that works although the mechanism list omits it is
reported "runnable (by trial; not in mechanism list: …)". The probe also
checks the RFC 5649 wrap mechanism of the token's table, the RSA exponent
the token generates, and whether it enforces CKA_WRAP_WITH_TRUSTED.

Then the PIN-holder matrix: throwaway keys are generated exactly as the
key ceremony makes them (issuer keys, KEK, transcript key; destroyed at the
end), a throwaway card is imported under them, and every way out an
attacker with the user PIN and a generic PKCS#11 client knows is tried
(set a usage on a key, copy it with another, unwrap c or a stored blob
into a readable key, derive or digest into one, wrap under a key of one's
own, make one's own trusted key, log in as SO with the user PIN, …). Each
path is "closed" with the token's refusal or OPEN with what came out.
On a token that enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2) the throwaway
KEK must be marked trusted by the security officer, as in the ceremony:
give --so-pin-file (or $BLINDPERSO_SO_PIN), else the KEK paths are not
tried. --no-attack skips the matrix (it writes throwaway token objects).

With several --token, each token is probed in turn. With --key and --kek
the tokens are then checked as the members of one group, as issuer import
and serve check them at start (same issuer key and KEK, proved with a
throwaway card), and each member's rate of imports and verifications
alone is measured (a quarter of a second each); a running issuer serve
shows each member's health and work in /metrics
(blindperso_issuer_token_member_*). With --json: one object per token,
then {"group": …}.

` + uriHelp,
		Example: `  issuer probe --token 'pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin' --so-pin-file so.pin
  issuer probe --token "$BLINDPERSO_TOKEN" --json | jq '.profiles[] | select(.runnable) | .profile'
  issuer probe --json --so-pin-file so.pin | jq '.pin_holder.results[] | select(.open) | .id'`,
		Args: cobra.NoArgs,
	}
	uris := c.Flags().StringArray("token", nil, "PKCS#11 URI of the token (default $"+envToken+"); repeat for the members of a group")
	readSOPIN := soPINFlag(c, "file holding the security officer's PIN, to make a trusted throwaway KEK for the PIN-holder matrix")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON, for scripts")
	c.Flags().BoolVar(&noAttack, "no-attack", false, "only the profile matrix: do not run the PIN-holder adversary")
	key := c.Flags().String("key", "", "with --kek: also check that every --token holds this issuer key and the KEK, and measure each member's rate")
	kek := c.Flags().String("kek", "", "label of the KEK, with --key")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		soPIN, err := readSOPIN()
		if err != nil {
			return err
		}
		list, err := tokenURIs(*uris)
		if err != nil {
			return err
		}
		if (*key == "") != (*kek == "") {
			return errors.New("--key and --kek go together")
		}
		for i, uri := range list {
			if len(list) > 1 && !asJSON {
				if i > 0 {
					fmt.Fprintln(cmd.OutOrStdout())
				}
				fmt.Fprintf(cmd.OutOrStdout(), "== token %d of %d ==\n", i+1, len(list))
			}
			if err := probeOne(cmd, uri, soPIN, asJSON, noAttack); err != nil {
				return err
			}
		}
		if *key == "" {
			return nil
		}
		return probeGroup(cmd, list, *key, *kek, asJSON)
	}
	return c
}

// probeOne probes one token and prints its report.
func probeOne(cmd *cobra.Command, uri, soPIN string, asJSON, noAttack bool) error {
	tok, err := hsm.OpenURI(uri, 1)
	if err != nil {
		return err
	}
	defer tok.Close()
	ctx := cmd.Context()
	r, err := tok.Probe(ctx)
	if err != nil {
		return err
	}
	var ph *pinholder.Report
	var phErr string // the adversary could not run: said, not fatal
	if !noAttack {
		if ph, err = probeWithPINHolder(ctx, tok, uri, soPIN); err != nil {
			if ctx.Err() != nil {
				return err
			}
			phErr = err.Error()
		}
	}
	pub := publishedTable(tok.Mechanisms())
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			*hsm.ProbeReport
			Published *tablePublished   `json:"table_published,omitempty"`
			PINHolder *pinholder.Report `json:"pin_holder,omitempty"`
			// PINHolderError says why the adversary did not run.
			PINHolderError string `json:"pin_holder_error,omitempty"`
		}{r, pub, ph, phErr})
	}
	if err := r.WriteText(cmd.OutOrStdout()); err != nil {
		return err
	}
	if pub != nil {
		fmt.Fprintf(cmd.OutOrStdout(), "\nnote: table %q is published, not measured (%s).\n"+
			"      The trials above are its first measurement: record them in docs/HSM.md and correct hsm/vendors.go.\n",
			pub.Table, pub.Source)
	}
	if phErr != "" {
		fmt.Fprintf(cmd.OutOrStdout(), "\nPIN-holder adversary: not run: %s\n"+
			"      (it attacks keys made as the ceremony makes them; a token that cannot make them runs no profile either)\n", phErr)
	}
	if ph == nil {
		return nil
	}
	fmt.Fprintln(cmd.OutOrStdout())
	return ph.WriteText(cmd.OutOrStdout())
}

// groupReport is what issuer probe --key --kek says of the tokens as a
// group: whether they hold the same keys (hsm.NewGroup's proof) and each
// member's rate alone.
type groupReport struct {
	Key     string        `json:"key"`
	KEK     string        `json:"kek"`
	Same    bool          `json:"same_keys"`
	Refusal string        `json:"refusal,omitempty"`
	Members []memberProbe `json:"members,omitempty"`
}

type memberProbe struct {
	Member         string  `json:"member"`
	ImportsPerSec  float64 `json:"imports_per_second"`
	VerifiesPerSec float64 `json:"verifications_per_second"`
	Error          string  `json:"error,omitempty"`
}

// probeGroup proves the tokens hold the same keys and measures each.
func probeGroup(cmd *cobra.Command, uris []string, key, kek string, asJSON bool) error {
	ctx := cmd.Context()
	var members []hsm.Member
	defer func() {
		for _, m := range members {
			m.Token.Close()
		}
	}()
	for i, u := range uris {
		m, err := openMember(ctx, u, 1, key, kek)
		if err != nil {
			return fmt.Errorf("token %d of %d: %w", i+1, len(uris), err)
		}
		members = append(members, m)
	}
	rep := groupReport{Key: key, KEK: kek}
	g, err := hsm.NewGroup(ctx, members, hsm.GroupOptions{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		rep.Refusal = err.Error()
	} else {
		defer g.Close(ctx)
		rep.Same = true
		for _, r := range g.Measure(ctx, 250*time.Millisecond) {
			mp := memberProbe{Member: r.Name, ImportsPerSec: r.Imports, VerifiesPerSec: r.Verifies}
			if r.Err != nil {
				mp.Error = r.Err.Error()
			}
			rep.Members = append(rep.Members, mp)
		}
	}
	out := cmd.OutOrStdout()
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]groupReport{"group": rep})
	}
	fmt.Fprintf(out, "\ntoken group of %d (issuer key %q, KEK %q):\n", len(uris), key, kek)
	if !rep.Same {
		fmt.Fprintf(out, "  REFUSED: %s\n", rep.Refusal)
		return errors.New("the tokens do not hold the same keys")
	}
	fmt.Fprintln(out, "  every member holds the same issuer key and KEK (a throwaway card gave the same wrapped key in each)")
	for _, m := range rep.Members {
		if m.Error != "" {
			fmt.Fprintf(out, "  %-24s FAILED: %s\n", m.Member, m.Error)
			continue
		}
		fmt.Fprintf(out, "  %-24s up, %6.0f imports/s, %6.0f verifications/s (alone, one session)\n", m.Member, m.ImportsPerSec, m.VerifiesPerSec)
	}
	return nil
}

func keygenCmd() *cobra.Command {
	var kind, label, out string
	c := &cobra.Command{
		Use:   "keygen --token URI --kind rsa2048|rsa3072|p256 --label L --out PUB.pem",
		Short: "Generate the issuer key pair in the token and export its public key",
		Long: `Generate the issuer key pair inside the token, as token objects labelled L
(the private key: sensitive, never extractable, unwrap only for RSA,
derive only for EC), write the public key to PUB.pem (PEM
SubjectPublicKeyInfo) and print its SHA-256 fingerprint on stdout: the
value perso stations check (perso run --expect-fingerprint) and cards may
pin. RSA keys get e = 3 where the token generates it (SoftHSM2; the
paper's choice), else 65537 (NSS softokn). Run 'issuer probe' first: rsa*
keys serve the rsa-* profiles, p256 keys the ecdh-p256-* profiles.

` + uriHelp,
		Example: `  export BLINDPERSO_TOKEN='pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin'
  issuer keygen --kind rsa2048 --label issuer-2026 --out issuer.pub.pem`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&kind, "kind", "", "key kind: rsa2048, rsa3072 or p256")
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the new key pair (unique in the token)")
	c.Flags().StringVar(&out, "out", "", "file to write the public key to (PEM); must not exist")
	for _, f := range []string{"kind", "label", "out"} {
		c.MarkFlagRequired(f)
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		// Refuse an existing file before a key is made for nothing.
		f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("public key file: %w", err)
		}
		tok, err := open(1)
		if err != nil {
			f.Close()
			os.Remove(out)
			return err
		}
		defer tok.Close()
		key, err := tok.GenerateIssuerKey(cmd.Context(), kind, label)
		if err != nil {
			f.Close()
			os.Remove(out)
			return err
		}
		if _, err := f.Write(key.PublicKeyPEM()); err != nil {
			f.Close()
			return fmt.Errorf("%s: %w (the key %q is in the token: export it with issuer pubkey)", out, err, label)
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "generated %s issuer key %q in token %q; public key in %s\n", key.Kind, label, tok.Info().Label, out)
		fmt.Fprintf(cmd.OutOrStdout(), "%x\n", key.Fingerprint())
		return nil
	}
	return c
}

func pubkeyCmd() *cobra.Command {
	var label, out string
	c := &cobra.Command{
		Use:   "pubkey --token URI --label L [--out PUB.pem]",
		Short: "Export the public key of an issuer key pair already in the token",
		Long: `Find the issuer key pair labelled L in the token and write its public key
(PEM SubjectPublicKeyInfo) to PUB.pem, or to stdout without --out. The
fingerprint goes to stderr.

` + uriHelp,
		Example: `  issuer pubkey --token "$BLINDPERSO_TOKEN" --label issuer-2026 --out issuer.pub.pem`,
		Args:    cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the key pair")
	c.Flags().StringVar(&out, "out", "", "file to write the public key to (PEM)")
	c.MarkFlagRequired("label")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		key, err := tok.FindIssuerKey(cmd.Context(), label)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "%s issuer key %q, fingerprint %x\n", key.Kind, label, key.Fingerprint())
		if out == "" {
			_, err = cmd.OutOrStdout().Write(key.PublicKeyPEM())
			return err
		}
		return os.WriteFile(out, key.PublicKeyPEM(), 0o644)
	}
	return c
}

// tablePublished is what `issuer probe --json` says about a table written
// from a vendor's published documentation rather than measured.
type tablePublished struct {
	Table  string             `json:"table"`
	Source string             `json:"source"`
	Claims []hsm.ProfileClaim `json:"claims,omitempty"`
}

func publishedTable(m *hsm.Mechanisms) *tablePublished {
	if !m.Published {
		return nil
	}
	return &tablePublished{Table: m.Name, Source: m.Source, Claims: m.Claims}
}
