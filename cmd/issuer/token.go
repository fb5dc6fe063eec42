package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"blindperso/hsm"
)

// Environment variables the token commands read.
const (
	envToken = "BLINDPERSO_TOKEN"  // default for --token
	envSOPIN = "BLINDPERSO_SO_PIN" // the security officer's PIN, if no --so-pin-file
)

// uriHelp is shared by the token commands' help.
const uriHelp = `The token is named by an RFC 7512 PKCS#11 URI (or $BLINDPERSO_TOKEN):

  SoftHSM2:
    pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin
  NSS softokn (database made with certutil -N -d sql:DIR --empty-password):
    pkcs11:token=NSS%20Certificate%20DB?module-path=/usr/lib/x86_64-linux-gnu/libsoftokn3.so&x-nss-configdir=/var/lib/blindperso/nssdb

token= is the token label (serial= also works), module-path= the PKCS#11
library. The PIN comes from pin-source=file:PATH (a trailing newline is
ignored) or pin-source=env:VAR; pin-value is refused: a PIN never goes on
a command line. Quote the URI in a shell: it contains '&'.
See docs/HSM.md.`

// tokenFlag adds --token to c and returns a function that opens the token.
func tokenFlag(c *cobra.Command) func(sessions int) (*hsm.Token, error) {
	uri := c.Flags().String("token", "", "PKCS#11 URI of the token (default $"+envToken+")")
	return func(sessions int) (*hsm.Token, error) {
		u := *uri
		if u == "" {
			u = os.Getenv(envToken)
		}
		if u == "" {
			return nil, errors.New("no token: give --token URI or set " + envToken)
		}
		return hsm.OpenURI(u, sessions)
	}
}

func probeCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "probe --token URI [--json]",
		Short: "Say which profiles a PKCS#11 token can run entirely in the token",
		Long: `Read the token's mechanism list, try every step the in-token chains need
on throwaway session objects (all destroyed afterwards; the token's keys
are not touched), and print, per profile, "runnable" or "not runnable:
missing CKM_…". A step that works although the mechanism list omits it is
reported "runnable (by trial; not in mechanism list: …)". The probe also
checks the RFC 5649 wrap mechanism of the token's table, the RSA exponent
the token generates, and whether it enforces CKA_WRAP_WITH_TRUSTED.

` + uriHelp,
		Example: `  issuer probe --token 'pkcs11:token=issuer?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/blindperso/user.pin'
  issuer probe --token "$BLINDPERSO_TOKEN" --json | jq '.profiles[] | select(.runnable) | .profile'`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON, for scripts")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		r, err := tok.Probe(context.Background())
		if err != nil {
			return err
		}
		if asJSON {
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(r)
		}
		return r.WriteText(cmd.OutOrStdout())
	}
	return c
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
		key, err := tok.GenerateIssuerKey(context.Background(), kind, label)
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
		key, err := tok.FindIssuerKey(context.Background(), label)
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

func kekCmd() *cobra.Command {
	var label, soPINFile string
	c := &cobra.Command{
		Use:   "kek --token URI --label L [--so-pin-file FILE]",
		Short: "Generate the key-encryption key under which K_I is stored",
		Long: `Generate the KEK in the token: AES-256, a private token object,
sensitive, never extractable, wrap and unwrap only.

On a token that enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2; see 'issuer
probe') every K_I can leave the token only wrapped under a key the
security officer marked CKA_TRUSTED, so this needs the SO PIN: from
--so-pin-file FILE, or from $BLINDPERSO_SO_PIN. Never on the command line.
The SO generates the KEK, trusted, as a session object; the user copies it
into a private token object, and the original is destroyed. Such a KEK
also forces every key unwrapped under it to be sensitive and not
extractable. Other tokens do not need the SO PIN.

` + uriHelp,
		Example: `  issuer kek --token "$BLINDPERSO_TOKEN" --label kek-2026 --so-pin-file /etc/blindperso/so.pin
  BLINDPERSO_SO_PIN="$(cat /run/secrets/so-pin)" issuer kek --label kek-2026`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the KEK (unique in the token)")
	c.Flags().StringVar(&soPINFile, "so-pin-file", "", "file holding the security officer's PIN (default $"+envSOPIN+")")
	c.MarkFlagRequired("label")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		soPIN := os.Getenv(envSOPIN)
		if soPINFile != "" {
			b, err := os.ReadFile(soPINFile)
			if err != nil {
				return fmt.Errorf("SO PIN: %w", err)
			}
			soPIN = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
		}
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		kek, err := tok.GenerateKEK(context.Background(), label, soPIN)
		if err != nil {
			return err
		}
		trust := "not trusted (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if kek.Trusted {
			trust = "CKA_TRUSTED, set by the security officer"
		}
		fmt.Fprintf(cmd.OutOrStdout(), "KEK %q generated in token %q: AES-256, %s\n", label, tok.Info().Label, trust)
		return nil
	}
	return c
}
